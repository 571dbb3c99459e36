"""AES-256-GCM for everything a counselor types: patient fields, notes, drafts, chats, adapters.

The key comes from an environment variable or a key file created on first run (0600, outside
the data folder, so a copied database alone reveals nothing). A wrong or missing key is
detected against a key-check value stored with the data before anything is read or written.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
KEY_BYTES = 32
KEY_CHECK_PLAINTEXT = "phyassist-key-check-v1"


class KeyProblem(RuntimeError):
    """The encryption key is missing, malformed or does not open this store."""


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode("ascii")


def decode_key(text: str, source: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise KeyProblem(f"{source}: not a base64 key") from None
    if len(key) != KEY_BYTES:
        raise KeyProblem(f"{source}: key must be {KEY_BYTES} bytes (base64 of 32 random bytes), got {len(key)}")
    return key


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def write_key_file(path: Path, key: bytes) -> None:
    """Create the key file with 0600 permissions from the first byte (no umask race)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(encode_key(key) + "\n")


def resolve_key(key_env: str, key_file: str | Path, data_dir: str | Path, store_has_data: bool) -> bytes:
    """Key from ``$key_env``, else ``key_file``; create the file only for a store with no data yet."""
    env_value = os.environ.get(key_env)
    if env_value:
        return decode_key(env_value, f"environment variable {key_env}")
    path = Path(key_file).expanduser()
    if _inside(path, Path(data_dir).expanduser()):
        raise KeyProblem(f"{path}: the key file must lie outside the data folder {data_dir}")
    if path.is_dir():
        raise KeyProblem(f"{path}: app.key_file is a folder, not a key file; point app.key_file at a file "
                         f"(or set {key_env})")
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyProblem(f"{path}: key file permissions are {oct(mode)}; run `chmod 600 {path}`")
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyProblem(f"{path}: cannot read the key file ({type(exc).__name__}: {exc})") from None
        return decode_key(text, str(path))
    if store_has_data:
        raise KeyProblem(f"no key: set {key_env} or restore {path}; the store holds encrypted data "
                         "and a new key cannot open it (nothing was changed)")
    key = new_key()
    write_key_file(path, key)
    return key


@dataclass(frozen=True)
class Cipher:
    """AES-256-GCM; each value has its own random nonce and is bound to its place (the associated
    data names its table, row and owner: see :mod:`phyassist.app.storage`)."""

    key: bytes

    def __post_init__(self):
        if len(self.key) != KEY_BYTES:
            raise KeyProblem(f"AES-256 needs a {KEY_BYTES}-byte key")

    def encrypt_bytes(self, data: bytes, context: str = "") -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + AESGCM(self.key).encrypt(nonce, data, context.encode("utf-8"))

    def decrypt_bytes(self, blob: bytes, context: str = "") -> bytes:
        try:
            return AESGCM(self.key).decrypt(bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]),
                                            context.encode("utf-8"))
        except (InvalidTag, ValueError):
            raise KeyProblem(f"cannot decrypt {context or 'value'}: wrong key or damaged data") from None

    def encrypt_text(self, text: str, context: str = "") -> bytes:
        return self.encrypt_bytes(text.encode("utf-8"), context)

    def decrypt_text(self, blob: bytes, context: str = "") -> str:
        return self.decrypt_bytes(blob, context).decode("utf-8")

    def encrypt_json(self, obj, context: str = "") -> bytes:
        return self.encrypt_text(json.dumps(obj, ensure_ascii=False), context)

    def decrypt_json(self, blob: bytes, context: str = ""):
        return json.loads(self.decrypt_text(blob, context))

    def subkey(self, purpose: str) -> bytes:
        """A key of its own for ``purpose`` (HMAC-SHA256 of the purpose under the key), so a MAC
        key never doubles as the encryption key."""
        return hmac.new(self.key, f"phyassist subkey: {purpose}".encode("utf-8"), hashlib.sha256).digest()

    def key_check(self) -> bytes:
        return self.encrypt_text(KEY_CHECK_PLAINTEXT, "key-check")

    def verify(self, check_blob: bytes) -> None:
        """Raise KeyProblem unless this key produced ``check_blob``."""
        try:
            ok = self.decrypt_text(check_blob, "key-check") == KEY_CHECK_PLAINTEXT
        except KeyProblem:
            ok = False
        if not ok:
            raise KeyProblem("wrong key: it does not open this store (nothing was read or changed)")


class DamagedRecord(KeyProblem):
    """A stored record that does not open with the store's (verified) key: changed, moved to another
    row, copied, or an older copy restored outside the app. Reported for that record alone."""
