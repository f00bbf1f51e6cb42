"""Keep secrets (W&B and judge API keys, hub tokens) out of manifests, saved configs and logs.

Secrets reach kinoe only through environment variables; configs name the variable, never
the value. As a second line of defence, everything kinoe writes about a run passes through
``redact``, which replaces the value of any secret-looking environment variable, and of any
variable a config declared secret (``run.secret_variables``) whatever its name.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
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
# Names no pattern catches, declared by the configs loaded in this process (run.secret_variables).
# Process-wide rather than passed along: the console's error line is written by the CLI, which
# never sees the config that declared them.
_declared: set[str] = set()


def declare_secret_variables(names: Iterable[str]) -> None:
    """Treat the values of these environment variables as secrets from now on in this process."""
    for name in set(names) - _declared:
        value = os.environ.get(name, "").strip()
        if 0 < len(value) < _MIN_SECRET_LENGTH:
            # Said once, by name: the user listed it and would otherwise assume it is hidden.
            logging.getLogger("kinoe.secrets").warning(
                "run.secret_variables: $%s is shorter than %d characters and is not redacted "
                "(so short a value would replace ordinary text); use a longer secret",
                name,
                _MIN_SECRET_LENGTH,
            )
        _declared.add(name)


def declared_secret_variables() -> frozenset[str]:
    """The names declared so far (``run.secret_variables`` of the configs loaded)."""
    return frozenset(_declared)


def forget_declared_secret_variables() -> None:
    """Start a new command with no declared names (the CLI, called repeatedly in one process)."""
    _declared.clear()


def secret_values(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Map each secret value found in the environment to the name of its variable."""
    env = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for name, value in env.items():
        if _is_secret(name, value) and len(value.strip()) >= _MIN_SECRET_LENGTH:
            found[value.strip()] = name
    return found


def _is_secret(name: str, value: str) -> bool:
    if name in KNOWN_SECRET_VARIABLES or name in _declared:
        return True
    if _SECRET_NAME.search(name) or _WEBHOOK_NAME.search(name):
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
