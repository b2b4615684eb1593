"""API keys: high-entropy random strings, stored as sha256 hex, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "trn_"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 256 bits: a plain sha256 is enough, no salt/KDF needed


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("ascii"), b.encode("ascii"))
