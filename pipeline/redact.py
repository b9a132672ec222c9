"""Secrets out of everything we write: manifests record the run's flags, never its credentials.

Beam takes object-store keys and tokens as ordinary pipeline options (`--s3_secret_access_key`,
`--azure_connection_string`, ...), so a manifest that records the options a run was given would
publish them with the corpus. Every manifest passes through `redact` before it is written.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"

# Option and field names that hold credentials, whatever the runner or file system calls them:
# matched on whole name parts, so `s3_session_token` is a secret and `max_tokens` is not.
_SECRET_PARTS = frozenset(
    {"secret", "password", "passwd", "token", "credential", "credentials", "apikey", "sas"}
)
_SECRET_PAIRS = (
    "api_key", "access_key", "private_key", "connection_string", "account_key", "session_key",
)  # fmt: skip
# user:password@ inside URLs and paths (s3://key:secret@bucket, https://u:p@host).
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]*:[^/@\s]*@", re.IGNORECASE)
# Query parameters that carry signatures or tokens (presigned URLs, Azure SAS).
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|"
    r"X-Goog-Credential|sig|signature|token|access_token|api_key|apikey|key)=)[^&#\s]*",
    re.IGNORECASE,
)


def is_secret_name(name: str) -> bool:
    """True for an option or field name that holds a credential."""
    normalized = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if _SECRET_PARTS & set(normalized.split("_")):
        return True
    return any(pair in normalized for pair in _SECRET_PAIRS)


def redact_text(text: str) -> str:
    """Passwords in URLs and signature/token query parameters replaced."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m.group('key')}{REDACTED}", text)


def redact_args(args: list[str]) -> list[str]:
    """Command-line flags with the values of secret options replaced (`--k=v` and `--k v`)."""
    out: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-"):
            name, sep, _value = arg.partition("=")
            if is_secret_name(name):
                if sep:
                    out.append(f"{name}={REDACTED}")
                else:
                    out.append(arg)
                    hide_next = True
                continue
        out.append(redact_text(arg))
    return out


def redact(value: Any) -> Any:
    """A JSON-like value with every secret replaced: by key name, in flag lists and in URLs."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if is_secret_name(str(k)) and v not in (None, "", [], {}) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        items = list(value)
        if any(isinstance(v, str) and v.startswith("--") for v in items) and all(
            isinstance(v, str) for v in items
        ):
            return redact_args(items)
        return [redact(v) for v in items]
    if isinstance(value, str):
        return redact_text(value)
    return value
