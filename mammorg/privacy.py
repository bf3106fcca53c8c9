"""Salted hashing of patient and study identifiers."""

from __future__ import annotations

import hashlib
import os

DEFAULT_SALT_ENV = "MAMMORG_ID_SALT"


def id_salt(salt: str | None = None) -> str:
    """The salt: explicit, else $MAMMORG_ID_SALT, else a fixed project default."""
    return salt or os.environ.get(DEFAULT_SALT_ENV) or "mammorg-default-salt"


def hash_id(value: str, salt: str | None = None, length: int = 12) -> str:
    """A short, stable, salted SHA-256 of an identifier."""
    digest = hashlib.sha256(f"{id_salt(salt)}:{value}".encode()).hexdigest()
    return digest[:length]
