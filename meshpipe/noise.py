"""The Noise Protocol Framework (revision 34), suite 25519 / ChaChaPoly / BLAKE2b.

A sans-IO library: objects take bytes and return bytes, nothing here touches a
socket or a clock. The layering follows the specification section by section:

- primitives (section 4): X25519 ``dh``, ChaCha20-Poly1305 with the Noise nonce
  layout, BLAKE2b ``hash_``, ``hmac_hash`` and ``hkdf``;
- ``CipherState`` (5.1), ``SymmetricState`` (5.2), ``HandshakeState`` (5.3);
- handshake patterns (7.x) as data: a small table in the specification's own
  notation, parsed into token lists that one generic engine executes. All the
  one-way, fundamental interactive and deferred patterns are supported, with any
  combination of ``pskN`` modifiers (section 9).

meshpipe uses ``Noise_IK_25519_ChaChaPoly_BLAKE2b`` (``PROTOCOL_IK``): the
responder's static key is derived from its node address, so the initiator needs
no lookup before its first message.

``python -m meshpipe.noise --vectors FILE`` checks a cacophony-format JSON vector
file and ends with a line ``N passed, M failed``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import hmac
import importlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError

from meshpipe.errors import MeshpipeError

DHLEN = 32
KEYLEN = 32
TAGLEN = 16
HASHLEN = 64
BLOCKLEN = 128
PSKLEN = 32
MAX_MESSAGE_LEN = 65535  # the specification's limit for any Noise message
# Nonce 2^64-1 is reserved for REKEY; no message may ever use it.
MAX_NONCE = 2**64 - 1

SUITE = ("25519", "ChaChaPoly", "BLAKE2b")
PROTOCOL_IK = "Noise_IK_25519_ChaChaPoly_BLAKE2b"


# -- errors ----------------------------------------------------------------------------


class NoiseError(MeshpipeError):
    """Base of every error the Noise layer raises."""


class UnsupportedProtocolError(NoiseError, ValueError):
    """A protocol name with an unknown pattern, modifier or cipher suite."""


class InvalidKeyError(NoiseError, ValueError):
    """A key of the wrong size, a key the pattern needs but was not given (or must
    not be given), or a peer public key that yields an all-zero DH result."""


class MalformedMessageError(NoiseError, ValueError):
    """A handshake message too short for its tokens, or longer than 65535 bytes."""


class MessageSizeError(NoiseError, ValueError):
    """A handshake message being written would exceed 65535 bytes."""


class DecryptError(NoiseError):
    """Authentication failed: the ciphertext, its nonce, key or associated data
    do not match."""


class NonceError(NoiseError):
    """The nonce space is exhausted, or an explicit nonce is out of range."""


class HandshakeStateError(NoiseError):
    """write/read called out of turn, after the handshake finished, or split()
    called before it finished; also a CipherState used without a key."""


class VectorMismatch(MeshpipeError):
    """A test vector did not reproduce (used by the vector checker only)."""


# -- primitives (section 4) ------------------------------------------------------------


def _check_len(value: bytes, length: int, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidKeyError(f"{what} must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) != length:
        raise InvalidKeyError(f"{what} must be {length} bytes, got {len(value)}")
    return value


@dataclass(frozen=True, repr=False)
class KeyPair:
    """An X25519 key pair (32-byte private and public keys)."""

    private: bytes
    public: bytes

    def __post_init__(self) -> None:
        _check_len(self.private, DHLEN, "private key")
        _check_len(self.public, DHLEN, "public key")

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        private = _check_len(private, DHLEN, "private key")
        return cls(private, crypto_scalarmult_base(private))

    @classmethod
    def generate(cls) -> KeyPair:
        # X25519 clamps the scalar itself, so 32 uniform bytes are a valid key.
        return cls.from_private(os.urandom(DHLEN))

    def __repr__(self) -> str:  # never print the private half
        return f"KeyPair(public={self.public.hex()})"


def dh(private: bytes, public: bytes) -> bytes:
    """X25519. A low-order peer key (all-zero result) is rejected with InvalidKeyError."""
    try:
        return crypto_scalarmult(private, public)
    except CryptoError as exc:  # libsodium refuses an all-zero shared secret
        raise InvalidKeyError("peer public key is a low-order point") from exc


def _nonce_bytes(n: int) -> bytes:
    # ChaChaPoly in Noise: 32 bits of zeros, then the 64-bit counter little-endian.
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


def _sodium() -> tuple[Any, Any] | None:
    """libsodium's cffi handles inside PyNaCl, for the per-packet AEAD calls: the public
    wrappers re-validate every argument (with eagerly formatted messages), which cost
    more than the cipher itself on a 1.3 kB packet. Keys and nonces are checked here."""
    try:
        mod = importlib.import_module("nacl._sodium")
    except ImportError:  # pragma: no cover - another PyNaCl build: use the wrappers
        return None
    return mod.ffi, mod.lib


_SODIUM = _sodium()


def _encrypt(k: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    nonce = _nonce_bytes(n)
    if _SODIUM is None or len(k) != KEYLEN:
        return crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, nonce, k)
    ffi, lib = _SODIUM
    out = ffi.new("unsigned char[]", len(plaintext) + TAGLEN)
    out_len = ffi.new("unsigned long long *")
    lib.crypto_aead_chacha20poly1305_ietf_encrypt(
        out, out_len, plaintext, len(plaintext), ad, len(ad), ffi.NULL, nonce, k
    )
    return bytes(ffi.buffer(out, out_len[0]))


def _decrypt(k: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    if len(ciphertext) < TAGLEN:  # libsodium would raise a bare ValueError
        raise DecryptError(f"ciphertext of {len(ciphertext)} bytes is shorter than the tag")
    nonce = _nonce_bytes(n)
    if _SODIUM is None or len(k) != KEYLEN:
        try:
            return crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, k)
        except CryptoError as exc:
            raise DecryptError("authentication tag mismatch") from exc
    ffi, lib = _SODIUM
    out = ffi.new("unsigned char[]", len(ciphertext) - TAGLEN)
    out_len = ffi.new("unsigned long long *")
    rc = lib.crypto_aead_chacha20poly1305_ietf_decrypt(
        out, out_len, ffi.NULL, ciphertext, len(ciphertext), ad, len(ad), nonce, k
    )
    if rc != 0:
        raise DecryptError("authentication tag mismatch")
    return bytes(ffi.buffer(out, out_len[0]))


def _rekey(k: bytes) -> bytes:
    # REKEY(k) for ChaChaPoly (section 4.2): encrypt 32 zero bytes with nonce 2^64-1.
    return _encrypt(k, MAX_NONCE, b"", bytes(KEYLEN))[:KEYLEN]


def hash_(data: bytes) -> bytes:
    """BLAKE2b-512."""
    return hashlib.blake2b(data).digest()


def hmac_hash(key: bytes, data: bytes) -> bytes:
    """HMAC (RFC 2104) over BLAKE2b with its 128-byte block, as section 4.3 defines it.
    (This is not BLAKE2b's own keyed mode.)"""
    return hmac.digest(key, data, "blake2b")


def hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> list[bytes]:
    """HKDF as section 4.3 defines it: two or three HASHLEN-byte outputs."""
    if num_outputs not in (2, 3):
        raise ValueError("hkdf gives 2 or 3 outputs")
    temp_key = hmac_hash(chaining_key, input_key_material)
    out = [hmac_hash(temp_key, b"\x01")]
    for i in range(2, num_outputs + 1):
        out.append(hmac_hash(temp_key, out[-1] + bytes((i,))))
    return out


# -- CipherState (5.1) -----------------------------------------------------------------


class CipherState:
    """A key ``k`` (or none) and a counter nonce ``n``.

    ``encrypt_with_ad``/``decrypt_with_ad`` use and advance the internal counter.
    ``encrypt_with_nonce``/``decrypt_with_nonce`` take the nonce from the caller and
    leave the counter alone: the session layer sends counters on the wire and keeps
    its own replay window.
    """

    __slots__ = ("_k", "_n")

    def __init__(self, key: bytes | None = None, nonce: int = 0) -> None:
        self._k: bytes | None = None
        self._n = 0
        self.initialize_key(key)
        self.set_nonce(nonce)

    def initialize_key(self, key: bytes | None) -> None:
        self._k = None if key is None else _check_len(key, KEYLEN, "cipher key")
        self._n = 0

    def has_key(self) -> bool:
        return self._k is not None

    @property
    def key(self) -> bytes | None:
        """The raw key, for handing a transport key to another process."""
        return self._k

    @property
    def nonce(self) -> int:
        return self._n

    def set_nonce(self, nonce: int) -> None:
        if not 0 <= nonce <= MAX_NONCE:
            raise NonceError(f"nonce {nonce} is outside 0..2^64-1")
        self._n = nonce

    def copy(self) -> CipherState:
        c = CipherState()
        c._k, c._n = self._k, self._n
        return c

    def _counter(self) -> int:
        if self._n >= MAX_NONCE:
            raise NonceError("nonce space exhausted; rekey is not enough, handshake again")
        return self._n

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._k is None:
            return bytes(plaintext)
        ct = _encrypt(self._k, self._counter(), bytes(ad), bytes(plaintext))
        self._n += 1
        return ct

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._k is None:
            return bytes(ciphertext)
        pt = _decrypt(self._k, self._counter(), bytes(ad), bytes(ciphertext))
        self._n += 1  # only after success: a forged message must not burn a nonce
        return pt

    def _explicit(self, n: int) -> bytes:
        if self._k is None:
            raise HandshakeStateError("this CipherState has no key")
        if not 0 <= n < MAX_NONCE:
            raise NonceError(f"nonce {n} is outside 0..2^64-2")
        return self._k

    def encrypt_with_nonce(self, n: int, ad: bytes, plaintext: bytes) -> bytes:
        return _encrypt(self._explicit(n), n, bytes(ad), bytes(plaintext))

    def decrypt_with_nonce(self, n: int, ad: bytes, ciphertext: bytes) -> bytes:
        return _decrypt(self._explicit(n), n, bytes(ad), bytes(ciphertext))

    def rekey(self) -> None:
        """k = REKEY(k); the nonce is left as it is (section 11.3)."""
        if self._k is None:
            raise HandshakeStateError("cannot rekey a CipherState that has no key")
        self._k = _rekey(self._k)

    def __repr__(self) -> str:
        return f"CipherState(has_key={self.has_key()}, nonce={self._n})"


# -- SymmetricState (5.2) --------------------------------------------------------------


class SymmetricState:
    """The chaining key ``ck``, the handshake hash ``h`` and a CipherState."""

    __slots__ = ("_ck", "_cs", "_h")

    def __init__(self, protocol_name: bytes) -> None:
        name = bytes(protocol_name)
        self._h = name.ljust(HASHLEN, b"\x00") if len(name) <= HASHLEN else hash_(name)
        self._ck = self._h
        self._cs = CipherState()

    def copy(self) -> SymmetricState:
        s = SymmetricState.__new__(SymmetricState)
        s._h, s._ck, s._cs = self._h, self._ck, self._cs.copy()
        return s

    def has_key(self) -> bool:
        return self._cs.has_key()

    def mix_key(self, input_key_material: bytes) -> None:
        self._ck, temp_k = hkdf(self._ck, input_key_material, 2)
        self._cs.initialize_key(temp_k[:KEYLEN])  # HASHLEN 64: truncate to 32

    def mix_hash(self, data: bytes) -> None:
        self._h = hash_(self._h + data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        self._ck, temp_h, temp_k = hkdf(self._ck, input_key_material, 3)
        self.mix_hash(temp_h)
        self._cs.initialize_key(temp_k[:KEYLEN])

    def get_handshake_hash(self) -> bytes:
        return self._h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = self._cs.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        pt = self._cs.decrypt_with_ad(self._h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = hkdf(self._ck, b"", 2)
        return CipherState(temp_k1[:KEYLEN]), CipherState(temp_k2[:KEYLEN])


# -- handshake patterns (section 7) ----------------------------------------------------

# Written as in the specification: pre-messages, "...", then messages. One-way
# patterns have a single message.
_PATTERN_TEXT: dict[str, str] = {
    # one-way (7.4)
    "N": "<- s ... -> e, es",
    "K": "-> s; <- s ... -> e, es, ss",
    "X": "<- s ... -> e, es, s, ss",
    # fundamental interactive (7.5)
    "NN": "-> e; <- e, ee",
    "NK": "<- s ... -> e, es; <- e, ee",
    "NX": "-> e; <- e, ee, s, es",
    "KN": "-> s ... -> e; <- e, ee, se",
    "KK": "-> s; <- s ... -> e, es, ss; <- e, ee, se",
    "KX": "-> s ... -> e; <- e, ee, se, s, es",
    "XN": "-> e; <- e, ee; -> s, se",
    "XK": "<- s ... -> e, es; <- e, ee; -> s, se",
    "XX": "-> e; <- e, ee, s, es; -> s, se",
    "IN": "-> e, s; <- e, ee, se",
    "IK": "<- s ... -> e, es, s, ss; <- e, ee, se",
    "IX": "-> e, s; <- e, ee, se, s, es",
    # deferred (7.6)
    "NK1": "<- s ... -> e; <- e, ee, es",
    "NX1": "-> e; <- e, ee, s; -> es",
    "X1N": "-> e; <- e, ee; -> s; <- se",
    "X1K": "<- s ... -> e, es; <- e, ee; -> s; <- se",
    "XK1": "<- s ... -> e; <- e, ee, es; -> s, se",
    "X1K1": "<- s ... -> e; <- e, ee, es; -> s; <- se",
    "X1X": "-> e; <- e, ee, s, es; -> s; <- se",
    "XX1": "-> e; <- e, ee, s; -> es, s, se",
    "X1X1": "-> e; <- e, ee, s; -> es, s; <- se",
    "K1N": "-> s ... -> e; <- e, ee; -> se",
    "K1K": "-> s; <- s ... -> e, es; <- e, ee; -> se",
    "KK1": "-> s; <- s ... -> e; <- e, ee, se, es",
    "K1K1": "-> s; <- s ... -> e; <- e, ee, es; -> se",
    "K1X": "-> s ... -> e; <- e, ee, s, es; -> se",
    "KX1": "-> s ... -> e; <- e, ee, se, s; -> es",
    "K1X1": "-> s ... -> e; <- e, ee, s; -> se, es",
    "I1N": "-> e, s; <- e, ee; -> se",
    "I1K": "<- s ... -> e, es, s; <- e, ee; -> se",
    "IK1": "<- s ... -> e, s; <- e, ee, se, es",
    "I1K1": "<- s ... -> e, s; <- e, ee, es; -> se",
    "I1X": "-> e, s; <- e, ee, s, es; -> se",
    "IX1": "-> e, s; <- e, ee, se, s; -> es",
    "I1X1": "-> e, s; <- e, ee, s; -> se, es",
}

_TOKENS = frozenset({"e", "s", "ee", "es", "se", "ss", "psk"})
_PRE_TOKENS = frozenset({"e", "s"})


@dataclass(frozen=True)
class HandshakePattern:
    """Token lists for one pattern. Message i is sent by the initiator when i is even."""

    name: str
    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]
    one_way: bool
    psk: bool  # any pskN modifier: "e" also calls MixKey (section 9.2)


def _tokens(text: str) -> tuple[str, ...]:
    toks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not set(toks) <= _TOKENS:
        raise ValueError(f"bad tokens in {text!r}")
    return toks


def _arrow(line: str) -> tuple[bool, tuple[str, ...]]:
    """Parse '-> a, b' or '<- a, b' into (from_initiator, tokens)."""
    line = line.strip()
    if line[:2] not in ("->", "<-"):
        raise ValueError(f"pattern line without an arrow: {line!r}")
    return line[:2] == "->", _tokens(line[2:])


def _parse_base(name: str) -> HandshakePattern:
    text = _PATTERN_TEXT[name]
    pre_text, _, msg_text = text.rpartition("...")
    init_pre: tuple[str, ...] = ()
    resp_pre: tuple[str, ...] = ()
    for line in filter(str.strip, pre_text.split(";")):
        from_init, toks = _arrow(line)
        if not set(toks) <= _PRE_TOKENS:
            raise ValueError(f"bad pre-message in pattern {name}")
        if from_init:
            init_pre = toks
        else:
            resp_pre = toks
    messages = []
    for i, line in enumerate(msg_text.split(";")):
        from_init, toks = _arrow(line)
        if from_init != (i % 2 == 0):
            raise ValueError(f"pattern {name} does not alternate")
        messages.append(toks)
    return HandshakePattern(name, init_pre, resp_pre, tuple(messages), len(name) == 1, False)


_PSK_RE = re.compile(r"psk(\d+)")


@functools.cache
def parse_pattern(name: str) -> HandshakePattern:
    """A pattern name with optional modifiers, e.g. ``IK``, ``NNpsk0+psk2``."""
    m = re.fullmatch(r"([NKXI1]+)([a-z].*)?", name)
    if m is None or m.group(1) not in _PATTERN_TEXT:
        raise UnsupportedProtocolError(f"unsupported handshake pattern {name!r}")
    base = _parse_base(m.group(1))
    if not m.group(2):
        return base
    messages = [list(msg) for msg in base.messages]
    seen: set[int] = set()
    for modifier in m.group(2).split("+"):
        pm = _PSK_RE.fullmatch(modifier)
        if pm is None:
            raise UnsupportedProtocolError(f"unsupported pattern modifier {modifier!r}")
        n = int(pm.group(1))
        if n in seen or n > len(messages):
            raise UnsupportedProtocolError(f"bad modifier {modifier!r} for pattern {name!r}")
        seen.add(n)
        # psk0 goes at the start of the first message, pskN at the end of message N.
        if n == 0:
            messages[0].insert(0, "psk")
        else:
            messages[n - 1].append("psk")
    return HandshakePattern(
        name,
        base.initiator_pre,
        base.responder_pre,
        tuple(tuple(msg) for msg in messages),
        base.one_way,
        True,
    )


def parse_protocol_name(protocol_name: str) -> HandshakePattern:
    """Check a full name like ``Noise_IK_25519_ChaChaPoly_BLAKE2b``; return its pattern."""
    parts = protocol_name.split("_")
    if len(parts) != 5 or parts[0] != "Noise":
        raise UnsupportedProtocolError(f"not a Noise protocol name: {protocol_name!r}")
    if tuple(parts[2:]) != SUITE:
        raise UnsupportedProtocolError(
            f"unsupported suite {'_'.join(parts[2:])!r}; only {'_'.join(SUITE)}"
        )
    return parse_pattern(parts[1])


# -- HandshakeState (5.3) --------------------------------------------------------------

_T = TypeVar("_T")


def _need(value: _T | None, what: str) -> _T:
    if value is None:  # unreachable for the built-in patterns: __init__ checks keys
        raise HandshakeStateError(f"the pattern needs {what}, which is not known yet")
    return value


def _as_keypair(key: KeyPair | bytes | None, what: str) -> KeyPair | None:
    if key is None or isinstance(key, KeyPair):
        return key
    try:
        return KeyPair.from_private(key)
    except InvalidKeyError as exc:
        raise InvalidKeyError(f"{what}: {exc}") from None


class HandshakeState:
    """One side of a Noise handshake.

    ``s``/``e`` are this side's static and ephemeral keys, as a KeyPair or a 32-byte
    private key. ``e`` is normally left out (generated when the pattern sends it);
    give it only to reproduce test vectors. ``rs``/``re`` are the peer's public keys
    known before the handshake (the pre-messages, e.g. ``rs`` for an IK initiator).

    ``read_message`` and ``write_message`` are atomic: if one raises, the state is as
    it was before, so a forged or corrupted packet cannot kill a handshake in progress; the genuine
    message can still be read afterwards.
    """

    def __init__(
        self,
        protocol_name: str,
        initiator: bool,
        *,
        prologue: bytes = b"",
        s: KeyPair | bytes | None = None,
        e: KeyPair | bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        self._pattern = parse_protocol_name(protocol_name)
        self._protocol_name = protocol_name
        self._initiator = bool(initiator)
        self._s = _as_keypair(s, "s")
        self._e = _as_keypair(e, "e")
        self._rs = None if rs is None else _check_len(rs, DHLEN, "rs")
        self._re = None if re is None else _check_len(re, DHLEN, "re")
        self._psks = tuple(_check_len(p, PSKLEN, "psk") for p in psks)
        self._psk_used = 0
        self._index = 0  # next message of the pattern
        self._check_keys()

        self._ss = SymmetricState(protocol_name.encode("ascii"))
        self._ss.mix_hash(bytes(prologue))
        # Pre-messages: the initiator's first, then the responder's.
        init_keys = (self._s, self._e) if initiator else (self._rs, self._re)
        resp_keys = (self._rs, self._re) if initiator else (self._s, self._e)
        for pre, (stat, eph) in (
            (self._pattern.initiator_pre, init_keys),
            (self._pattern.responder_pre, resp_keys),
        ):
            for tok in pre:
                key = stat if tok == "s" else eph
                pub = key.public if isinstance(key, KeyPair) else _need(key, tok)
                self._ss.mix_hash(pub)
                if tok == "e" and self._pattern.psk:
                    self._ss.mix_key(pub)

    def _pre_messages(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        p = self._pattern
        if self._initiator:
            return p.initiator_pre, p.responder_pre
        return p.responder_pre, p.initiator_pre

    def _check_keys(self) -> None:
        mine, theirs = self._pre_messages()
        p = self._pattern
        sent = {
            t for i, msg in enumerate(p.messages) if (i % 2 == 0) == self._initiator for t in msg
        }
        if self._s is None and ("s" in mine or "s" in sent):
            raise InvalidKeyError(f"{p.name} needs this side's static key s")
        if self._e is None and "e" in mine:
            raise InvalidKeyError(f"{p.name} needs this side's pre-shared ephemeral key e")
        # A remote key is given exactly when the pattern says it is known in advance;
        # otherwise a key sent in a message would silently replace the caller's.
        for tok, value, what in (("s", self._rs, "rs"), ("e", self._re, "re")):
            if (tok in theirs) != (value is not None):
                need = "needs" if tok in theirs else "does not take"
                raise InvalidKeyError(f"{p.name} {need} the remote key {what} in advance")
        wanted = sum(msg.count("psk") for msg in p.messages)
        if len(self._psks) != wanted:
            raise InvalidKeyError(f"{p.name} needs {wanted} psks, got {len(self._psks)}")

    # -- state ---------------------------------------------------------------------

    @property
    def protocol_name(self) -> str:
        return self._protocol_name

    @property
    def pattern(self) -> HandshakePattern:
        return self._pattern

    @property
    def initiator(self) -> bool:
        return self._initiator

    @property
    def complete(self) -> bool:
        return self._index >= len(self._pattern.messages)

    @property
    def is_my_turn(self) -> bool:
        """True when the next call should be write_message (False once complete)."""
        return not self.complete and (self._index % 2 == 0) == self._initiator

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key, once known (for IK: after message 1)."""
        return self._rs

    @property
    def remote_ephemeral(self) -> bytes | None:
        return self._re

    @property
    def local_ephemeral(self) -> KeyPair | None:
        return self._e

    def get_handshake_hash(self) -> bytes:
        """h: equal on both sides after the handshake; a channel-binding value."""
        return self._ss.get_handshake_hash()

    def _turn(self, writing: bool) -> tuple[str, ...]:
        if self.complete:
            raise HandshakeStateError("the handshake is already complete")
        if self.is_my_turn != writing:
            verb = "write" if writing else "read"
            raise HandshakeStateError(f"not this side's turn to {verb} message {self._index}")
        return self._pattern.messages[self._index]

    def _snapshot(self) -> tuple[SymmetricState, KeyPair | None, bytes | None, bytes | None, int]:
        return self._ss.copy(), self._e, self._rs, self._re, self._psk_used

    def _restore(
        self, snap: tuple[SymmetricState, KeyPair | None, bytes | None, bytes | None, int]
    ) -> None:
        self._ss, self._e, self._rs, self._re, self._psk_used = snap

    def _mix_token(self, tok: str) -> None:
        """The tokens that are the same for writer and reader: DHs and psk."""
        if tok == "psk":
            self._ss.mix_key_and_hash(self._psks[self._psk_used])
            self._psk_used += 1
            return
        # "es" is DH(initiator's e, responder's s); from the responder's side that is
        # DH(own s, remote e). Likewise for "se".
        local, remote = tok[0], tok[1]
        if not self._initiator and tok in ("es", "se"):
            local, remote = remote, local
        priv = _need(self._e if local == "e" else self._s, f"local {local}").private
        pub = _need(self._re if remote == "e" else self._rs, f"remote {remote}")
        self._ss.mix_key(dh(priv, pub))

    def write_message(self, payload: bytes = b"") -> bytes:
        """Process the next message pattern and return the message to send."""
        tokens = self._turn(writing=True)
        snap = self._snapshot()
        try:
            out = bytearray()
            for tok in tokens:
                if tok == "e":
                    if self._e is None:
                        self._e = KeyPair.generate()
                    out += self._e.public
                    self._ss.mix_hash(self._e.public)
                    if self._pattern.psk:
                        self._ss.mix_key(self._e.public)
                elif tok == "s":
                    out += self._ss.encrypt_and_hash(_need(self._s, "local s").public)
                else:
                    self._mix_token(tok)
            out += self._ss.encrypt_and_hash(bytes(payload))
            if len(out) > MAX_MESSAGE_LEN:
                raise MessageSizeError(f"handshake message of {len(out)} bytes is too long")
        except NoiseError:
            self._restore(snap)
            raise
        self._index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Process a received message; return its payload. Raises only NoiseError
        subclasses for bad input, and then leaves the state unchanged."""
        tokens = self._turn(writing=False)
        msg = bytes(message)
        if len(msg) > MAX_MESSAGE_LEN:
            raise MalformedMessageError(f"handshake message of {len(msg)} bytes is too long")
        need = self._min_length(tokens)
        if len(msg) < need:
            # Checked before any crypto, so a truncated message reads as truncated
            # rather than as a failed decryption somewhere in the middle.
            raise MalformedMessageError(
                f"handshake message {self._index} too short: {len(msg)} bytes, need {need}"
            )
        snap = self._snapshot()
        try:
            payload = self._read_tokens(tokens, msg)
        except NoiseError:
            self._restore(snap)
            raise
        self._index += 1
        return payload

    def _min_length(self, tokens: tuple[str, ...]) -> int:
        """Smallest valid message for these tokens (empty payload)."""
        keyed = self._ss.has_key()
        n = 0
        for tok in tokens:
            if tok == "e":
                n += DHLEN
                keyed = keyed or self._pattern.psk  # psk mode: e also calls MixKey
            elif tok == "s":
                n += DHLEN + (TAGLEN if keyed else 0)
            else:
                keyed = True  # every DH token and psk calls MixKey
        return n + (TAGLEN if keyed else 0)

    def _read_tokens(self, tokens: tuple[str, ...], msg: bytes) -> bytes:
        pos = 0

        def take(n: int, what: str) -> bytes:
            nonlocal pos
            if len(msg) - pos < n:
                raise MalformedMessageError(
                    f"handshake message {self._index} too short: {what} needs {n} bytes "
                    f"at offset {pos}, message has {len(msg)}"
                )
            pos += n
            return msg[pos - n : pos]

        for tok in tokens:
            if tok == "e":
                self._re = take(DHLEN, "e")
                self._ss.mix_hash(self._re)
                if self._pattern.psk:
                    self._ss.mix_key(self._re)
            elif tok == "s":
                n = DHLEN + TAGLEN if self._ss.has_key() else DHLEN
                self._rs = self._ss.decrypt_and_hash(take(n, "s"))
            else:
                self._mix_token(tok)
        rest = msg[pos:]
        if self._ss.has_key() and len(rest) < TAGLEN:
            raise MalformedMessageError(
                f"handshake message {self._index} too short: payload needs a {TAGLEN}-byte tag"
            )
        return self._ss.decrypt_and_hash(rest)

    def split(self) -> tuple[CipherState, CipherState]:
        """(c1, c2) as in the specification: c1 carries initiator -> responder,
        c2 responder -> initiator. One-way patterns use c1 only."""
        if not self.complete:
            raise HandshakeStateError("split() before the handshake is complete")
        return self._ss.split()

    def transport(self) -> tuple[CipherState, CipherState]:
        """(send, receive) CipherStates for this side."""
        c1, c2 = self.split()
        return (c1, c2) if self._initiator else (c2, c1)


# -- cacophony vector checker ----------------------------------------------------------


def _hex(vector: Mapping[str, Any], key: str) -> bytes | None:
    value = vector.get(key)
    return None if value is None else bytes.fromhex(value)


def _side(vector: Mapping[str, Any], prefix: str, initiator: bool) -> HandshakeState:
    return HandshakeState(
        vector["protocol_name"],
        initiator,
        prologue=_hex(vector, f"{prefix}_prologue") or b"",
        s=_hex(vector, f"{prefix}_static"),
        e=_hex(vector, f"{prefix}_ephemeral"),
        rs=_hex(vector, f"{prefix}_remote_static"),
        re=_hex(vector, f"{prefix}_remote_ephemeral"),
        psks=[bytes.fromhex(p) for p in vector.get(f"{prefix}_psks") or ()],
    )


def _expect(what: str, got: bytes, want: bytes) -> None:
    if got != want:
        raise VectorMismatch(f"{what}: got {got.hex()}, want {want.hex()}")


def check_vector(vector: Mapping[str, Any]) -> None:
    """Run one cacophony vector. Raises UnsupportedProtocolError when the protocol is
    not supported, VectorMismatch (or another error) when it does not reproduce."""
    pattern = parse_protocol_name(vector["protocol_name"])
    init = _side(vector, "init", True)
    resp = _side(vector, "resp", False)
    messages = [
        (bytes.fromhex(m["payload"]), bytes.fromhex(m["ciphertext"])) for m in vector["messages"]
    ]
    n_hs = len(pattern.messages)
    if len(messages) < n_hs:
        raise VectorMismatch(f"{len(messages)} messages, the handshake has {n_hs}")

    for i, (payload, want) in enumerate(messages[:n_hs]):
        sender, receiver = (init, resp) if i % 2 == 0 else (resp, init)
        _expect(f"message {i}", sender.write_message(payload), want)
        _expect(f"message {i} payload", receiver.read_message(want), payload)
    # handshake_hash is optional in the vector format: without it, both sides must
    # still agree on h (the transport messages below check the keys byte for byte).
    want_hash = _hex(vector, "handshake_hash")
    if want_hash is None:
        want_hash = init.get_handshake_hash()
    else:
        _expect("initiator handshake hash", init.get_handshake_hash(), want_hash)
    _expect("responder handshake hash", resp.get_handshake_hash(), want_hash)

    # Transport messages keep alternating by index (one-way: always initiator ->
    # responder). c1 carries initiator -> responder, c2 the other way.
    (i_c1, i_c2), (r_c1, r_c2) = init.split(), resp.split()
    for i, (payload, want) in enumerate(messages[n_hs:], start=n_hs):
        tx, rx = (i_c1, r_c1) if pattern.one_way or i % 2 == 0 else (r_c2, i_c2)
        _expect(f"message {i}", tx.encrypt_with_ad(b"", payload), want)
        _expect(f"message {i} payload", rx.decrypt_with_ad(b"", want), payload)


@dataclass
class VectorReport:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    lines: list[str] = field(default_factory=list)


def check_vectors(vectors: Sequence[Mapping[str, Any]]) -> VectorReport:
    report = VectorReport()
    for v in vectors:
        name = str(v.get("protocol_name", "<no protocol_name>"))
        try:
            parse_protocol_name(name)
        except UnsupportedProtocolError as exc:
            report.skipped += 1
            report.lines.append(f"skip {name}: {exc}")
            continue
        try:
            check_vector(v)
        except (MeshpipeError, KeyError, ValueError, TypeError) as exc:
            report.failed += 1
            report.lines.append(f"FAIL {name}: {type(exc).__name__}: {exc}")
        else:
            report.passed += 1
            report.lines.append(f"ok   {name}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m meshpipe.noise",
        description="Check Noise test vectors (cacophony JSON format).",
    )
    ap.add_argument("--vectors", required=True, metavar="FILE", help="cacophony JSON file")
    args = ap.parse_args(argv)
    try:
        with open(args.vectors, encoding="utf-8") as fh:
            data = json.load(fh)
        vectors = data["vectors"] if isinstance(data, dict) else data
        if not isinstance(vectors, list) or not all(isinstance(v, dict) for v in vectors):
            raise ValueError("expected a list of vector objects")
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {args.vectors}: cannot read vectors: {exc}", file=sys.stderr)
        print("0 passed, 0 failed")
        return 2
    report = check_vectors(vectors)
    for line in report.lines:
        print(line)
    if report.skipped:
        print(f"skipped {report.skipped} vectors with an unsupported pattern or suite")
    print(f"{report.passed} passed, {report.failed} failed")
    return 0 if report.failed == 0 and report.passed > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
