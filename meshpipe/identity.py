"""Node identity: an Ed25519 key pair whose public key is the node address (SID).

Text form of a SID: 64 lowercase hex characters. People may type any unambiguous
prefix of at least 8 characters wherever a SID is asked for.

Overlay IPv6 address: ``fd`` followed by the first 15 bytes of
BLAKE2b(SID, digest_size=15, person=b"meshpipe-ipv6"). It is deterministic and lies
inside fd00::/8; hashing (rather than copying SID bytes) keeps the address from
being chosen freely by grinding keys for a prefix.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from meshpipe.errors import KeyFileError, SidError

SID_LEN = 32
SIG_LEN = 64
MIN_PREFIX = 8
KEY_FILE_TAG = "meshpipe-ed25519-v1"
_HEX = frozenset("0123456789abcdef")


class Sid(bytes):
    """A 32-byte node address. ``str()`` gives the canonical hex text form."""

    def __new__(cls, raw: bytes) -> Sid:
        if len(raw) != SID_LEN:
            raise SidError(f"a SID is {SID_LEN} bytes, got {len(raw)}")
        return super().__new__(cls, raw)

    def __str__(self) -> str:
        return self.hex()

    def __repr__(self) -> str:
        return f"Sid({self.short})"

    @property
    def short(self) -> str:
        """The 8-character prefix used in logs and tables."""
        return self.hex()[:MIN_PREFIX]

    @classmethod
    def parse(cls, text: str) -> Sid:
        """Parse a full SID in text form."""
        t = text.strip().lower()
        if len(t) != 2 * SID_LEN or not set(t) <= _HEX:
            raise SidError(f"not a SID (want {2 * SID_LEN} hex characters): {text!r}")
        return cls(bytes.fromhex(t))

    def ipv6(self) -> ipaddress.IPv6Address:
        return overlay_ipv6(self)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True when ``signature`` is this node's Ed25519 signature of ``message``."""
        if len(signature) != SIG_LEN:
            return False
        try:
            VerifyKey(bytes(self)).verify(message, signature)
        except (BadSignatureError, ValueError):
            return False
        return True

    def x25519_public(self) -> bytes:
        """The X25519 public key derived from this Ed25519 SID (for key agreement)."""
        try:
            return bytes(VerifyKey(bytes(self)).to_curve25519_public_key())
        except Exception as exc:  # libsodium refuses points that are not on the curve
            raise SidError(f"SID {self.short} is not a valid Ed25519 public key") from exc


def overlay_ipv6(sid: bytes) -> ipaddress.IPv6Address:
    digest = hashlib.blake2b(bytes(sid), digest_size=15, person=b"meshpipe-ipv6").digest()
    return ipaddress.IPv6Address(b"\xfd" + digest)


def resolve_sid(text: str, known: Iterable[bytes]) -> Sid:
    """Resolve a typed SID or prefix (>= 8 hex chars) against the SIDs a node knows."""
    t = text.strip().lower()
    if len(t) == 2 * SID_LEN:
        return Sid.parse(t)
    if len(t) < MIN_PREFIX:
        raise SidError(f"SID prefix {text!r} is too short: give at least {MIN_PREFIX} characters")
    if not set(t) <= _HEX:
        raise SidError(f"SID prefix {text!r} is not hex")
    matches = {bytes(k) for k in known if bytes(k).hex().startswith(t)}
    if not matches:
        raise SidError(f"no known node has a SID starting with {t}")
    if len(matches) > 1:
        raise SidError(f"SID prefix {t} is ambiguous: {len(matches)} nodes match")
    return Sid(matches.pop())


@dataclass(frozen=True)
class Identity:
    """A node's secret key and the address derived from it."""

    signing_key: SigningKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(SigningKey(seed))

    @property
    def sid(self) -> Sid:
        return Sid(bytes(self.signing_key.verify_key))

    def sign(self, message: bytes) -> bytes:
        return bytes(self.signing_key.sign(message).signature)

    def x25519_private(self) -> bytes:
        return bytes(self.signing_key.to_curve25519_private_key())

    def x25519_keypair(self) -> tuple[PrivateKey, PublicKey]:
        priv = self.signing_key.to_curve25519_private_key()
        return priv, priv.public_key

    # -- key files -----------------------------------------------------------------

    def dump(self) -> str:
        seed = bytes(self.signing_key).hex()
        return (
            "# meshpipe node key. Keep it secret: whoever holds it is this node.\n"
            f"{KEY_FILE_TAG} {seed} {self.sid}\n"
        )

    def write(self, path: str) -> None:
        """Write a new key file with mode 0600; refuse to overwrite an existing one."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise KeyFileError(f"{path}: already exists; refusing to overwrite a key") from exc
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot create: {exc.strerror}") from exc
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o600)  # the umask must not widen it
            fh.write(self.dump())

    @classmethod
    def load(cls, path: str) -> Identity:
        """Load a key file, refusing one that others can read or that is damaged."""
        try:
            st = os.stat(path)
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot read key file: {exc.strerror}") from exc
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise KeyFileError(
                f"{path}: key file is readable by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        try:
            with open(path, encoding="ascii") as fh:
                text = fh.read(4096)
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"{path}: cannot read key file: {exc}") from exc
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: str = "<key>") -> Identity:
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        if len(lines) != 1:
            raise KeyFileError(f"{path}: not a meshpipe key file (expected one key line)")
        parts = lines[0].split()
        if len(parts) != 3 or parts[0] != KEY_FILE_TAG:
            raise KeyFileError(f"{path}: not a meshpipe key file (bad key line)")
        seed_hex, sid_hex = parts[1], parts[2]
        if len(seed_hex) != 64 or not set(seed_hex) <= _HEX:
            raise KeyFileError(f"{path}: key is truncated or corrupt")
        ident = cls.from_seed(bytes.fromhex(seed_hex))
        if str(ident.sid) != sid_hex:
            raise KeyFileError(f"{path}: key is corrupt (the stored SID does not match the key)")
        return ident
