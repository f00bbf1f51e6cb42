"""The MT-Bench judge's HTTP client: OpenAI-compatible chat completions over httpx, with retries.

The key goes only to the configured endpoint's origin (scheme, host and port). Redirects are
not followed by httpx: one to the same origin is followed here (an API moved under its root),
one to any other origin stops the whole run, because a judge that hands its callers to another
host is a misconfiguration to fix, not a failure to retry. ``http://`` is refused for every host
but loopback when the config is read (``eval.config.check_endpoint_url``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import httpx

from common.errors import KinoeError
from eval.config import JudgeConfig, JudgeEndpointConfig, check_endpoint_url

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# Same-origin hops allowed per request; a loop of redirects fails like any other bad reply.
MAX_REDIRECTS = 5


class JudgeError(KinoeError):
    """A judge request that failed for good (after its retries, or with a non-retryable status)."""


class JudgeRedirected(KinoeError):
    """The endpoint redirected to another origin: nothing more is sent anywhere this run."""


class JudgeReply(NamedTuple):
    """The judge's text, and the model the endpoint says answered (it pins an alias like gpt-4)."""

    text: str
    model: str | None


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


class JudgeClient:
    """A minimal OpenAI-compatible chat-completions client with retries and exponential backoff.

    The key is read from the environment variable the config names and sent only in the
    ``Authorization`` header; no message, log line or file written here contains it.
    """

    def __init__(
        self,
        endpoint: JudgeEndpointConfig,
        judge: JudgeConfig,
        logger: logging.Logger,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        base_url = endpoint.base_url
        if not base_url:
            base_url = os.environ.get("OPENAI_BASE_URL")
            if not base_url:
                raise KinoeError(
                    "judge_endpoint.base_url is not set (nor OPENAI_BASE_URL); set it to an "
                    "OpenAI-compatible API root, e.g. judge_endpoint.base_url=https://api.openai.com/v1"
                )
            try:  # the config's own base_url was checked when it was read
                check_endpoint_url(base_url, "$OPENAI_BASE_URL")
            except ValueError as error:
                raise KinoeError(str(error)) from None
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.origin = _origin(httpx.URL(self.url))
        self.endpoint, self.judge, self.logger, self.sleep = endpoint, judge, logger, sleep
        self._key = os.environ.get(endpoint.api_key_env, "").strip()
        if not self._key:
            logger.warning(
                "judge: $%s is empty; sending requests without a key", endpoint.api_key_env
            )
        # trust_env keeps the cluster's HTTPS_PROXY / NO_PROXY and SSL_CERT_FILE working.
        self._http = httpx.Client(
            timeout=endpoint.timeout_s,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=endpoint.parallel),
        )
        self.retries = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def _scrub(self, text: str) -> str:
        """``text`` without the key, should an endpoint echo it back in an error."""
        return text.replace(self._key, "<redacted>") if self._key else text

    def _send(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """One POST, following same-origin redirects only."""
        request = self._http.build_request("POST", self.url, content=body, headers=headers)
        for _ in range(MAX_REDIRECTS + 1):
            response = self._http.send(request)
            if response.next_request is None:
                return response
            response.close()
            target = response.next_request.url
            if _origin(target) != self.origin:
                scheme, host, port = _origin(target)
                raise JudgeRedirected(
                    self._scrub(
                        f"judge endpoint {self.url} redirected to another origin "
                        f"({scheme}://{host}:{port}); kinoe sends the judge key only to the "
                        "configured endpoint: set judge_endpoint.base_url to the API root you trust"
                    )
                )
            request = response.next_request
        raise httpx.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects", request=request)

    def chat(self, system: str, user: str) -> JudgeReply:
        """The judge's reply to one system + user message."""
        body = json.dumps(
            {
                "model": self.judge.model,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": user},
                ],
                "temperature": self.judge.temperature,
                "max_tokens": self.judge.max_tokens,
            },
            ensure_ascii=False,
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        problem = ""
        for attempt in range(self.endpoint.max_retries + 1):
            retry_after = None
            try:
                response = self._send(body, headers)
                if response.status_code >= 300:
                    detail = response.text[:200].replace("\n", " ")
                    problem = self._scrub(f"HTTP {response.status_code} {detail}".strip())
                    if response.status_code not in _RETRY_STATUS:
                        raise JudgeError(f"judge endpoint {self.url} answered {problem}")
                    retry_after = _seconds(response.headers.get("Retry-After"))
                else:
                    payload = response.json()
                    served = payload.get("model")
                    return JudgeReply(
                        str(payload["choices"][0]["message"]["content"]),
                        served if isinstance(served, str) else None,
                    )
            except httpx.TransportError as error:
                problem = self._scrub(f"{type(error).__name__}: {error}")
            except httpx.TooManyRedirects as error:
                problem = self._scrub(str(error))
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
                problem = "a reply that is not chat-completions JSON"
            if attempt == self.endpoint.max_retries:
                break
            delay = min(self.endpoint.backoff_s * 2**attempt, self.endpoint.max_backoff_s)
            delay = max(delay, retry_after or 0.0)
            with self._lock:
                self.retries += 1
            self.logger.info("judge: %s; retry %s in %.1f s", problem, attempt + 1, delay)
            self.sleep(delay)
        raise JudgeError(
            f"judge endpoint {self.url} failed {self.endpoint.max_retries + 1} times (last: {problem})"
        )


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
