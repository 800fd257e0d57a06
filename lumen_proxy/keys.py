"""API key format and hashing.

Keys are ``sk_`` + 40 random base62 characters (238 bits from :mod:`secrets`). Such keys need no
slow password hash: SHA-256 of a high-entropy secret cannot be brute-forced, and it keeps the lookup
on the request path at about a microsecond.
"""

from __future__ import annotations

import hashlib
import secrets
import string

PREFIX = "sk_"
_ALPHABET = string.ascii_letters + string.digits
_RANDOM_CHARS = 40
VISIBLE = 8  # characters of the key shown in listings: "sk_AbCdE"


def new_key() -> str:
    return PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_CHARS))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(text: str) -> bool:
    return text.startswith(PREFIX) and len(text) > len(PREFIX) + 16


def visible_prefix(key: str) -> str:
    return key[:VISIBLE]
