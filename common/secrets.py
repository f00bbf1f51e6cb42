"""Keep secrets (W&B and judge API keys, hub tokens) out of manifests, saved configs and logs.

Secrets reach kinoe only through environment variables; configs name the variable, never
the value. As a second line of defence, everything kinoe writes about a run passes through
``redact``, which replaces the value of any secret-looking environment variable.
"""

from __future__ import annotations

import os
import re
from typing import Any

# Variables that hold credentials by name; anything matching the pattern counts too.
KNOWN_SECRET_VARIABLES = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
_SECRET_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
# A webhook URL is its own credential (whoever has it can post), whatever the variable's name.
_WEBHOOK_NAME = re.compile(r"WEBHOOK", re.IGNORECASE)
# Any other URL is a secret when it carries one: user:password@ or a key/token in the query.
_URL_NAME = re.compile(r"_(URL|URI)$", re.IGNORECASE)
_URL_CREDENTIAL = re.compile(
    r"://[^/@\s]+@|[?&](access_?token|token|key|api_?key|sig|signature|secret|password)=",
    re.IGNORECASE,
)
# Short values ("1", "true") would redact innocent text; real keys are long.
_MIN_SECRET_LENGTH = 8


def secret_values(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Map each secret value found in the environment to the name of its variable."""
    env = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for name, value in env.items():
        if _is_secret(name, value) and len(value.strip()) >= _MIN_SECRET_LENGTH:
            found[value.strip()] = name
    return found


def _is_secret(name: str, value: str) -> bool:
    if name in KNOWN_SECRET_VARIABLES or _SECRET_NAME.search(name) or _WEBHOOK_NAME.search(name):
        return True
    return bool(_URL_NAME.search(name) and _URL_CREDENTIAL.search(value))


def redact(value: Any, secrets: dict[str, str] | None = None) -> Any:
    """Return ``value`` (str, or JSON-like dicts and lists) with every secret replaced by ``<redacted:NAME>``."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return value
    if isinstance(value, str):
        for secret, name in secrets.items():
            if secret in value:
                value = value.replace(secret, f"<redacted:{name}>")
        return value
    if isinstance(value, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, secrets) for v in value]
    return value
