"""meshpipe.noise: cacophony vectors, the CLI checker, error paths, and IK between
two meshpipe identities."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpipe.errors import MeshpipeError
from meshpipe.identity import Identity
from meshpipe.noise import (
    MAX_NONCE,
    PROTOCOL_IK,
    CipherState,
    DecryptError,
    HandshakeState,
    HandshakeStateError,
    InvalidKeyError,
    KeyPair,
    MalformedMessageError,
    NoiseError,
    NonceError,
    UnsupportedProtocolError,
    VectorMismatch,
    check_vector,
    check_vectors,
    parse_protocol_name,
)

VECTORS = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "vectors"
    / "noise-cacophony-25519-chachapoly-blake2b.json"
)
SUITE = "25519_ChaChaPoly_BLAKE2b"
ONE_WAY = ["N", "K", "X"]
INTERACTIVE = ["NN", "NK", "NX", "KN", "KK", "KX", "XN", "XK", "XX", "IN", "IK", "IX"]
FUNDAMENTAL = ONE_WAY + INTERACTIVE


@pytest.fixture(scope="module")
def vectors() -> list[dict[str, Any]]:
    # The reference file is required: a missing file is a failure, never a skip.
    assert VECTORS.is_file(), f"Noise test vectors missing: {VECTORS}"
    data = json.loads(VECTORS.read_text(encoding="utf-8"))
    result: list[dict[str, Any]] = data["vectors"]
    assert result
    return result


def _pattern_of(vector: dict[str, Any]) -> str:
    return str(vector["protocol_name"]).split("_")[1]


# -- vectors -----------------------------------------------------------------------


def test_every_ik_vector_passes(vectors: list[dict[str, Any]]) -> None:
    ik = [v for v in vectors if re.fullmatch(r"IK(psk\d.*)?", _pattern_of(v))]
    assert any(v["protocol_name"] == PROTOCOL_IK for v in ik)
    for v in ik:
        check_vector(v)  # raises on any byte difference


def test_all_supported_vectors_pass(vectors: list[dict[str, Any]]) -> None:
    report = check_vectors(vectors)
    failures = [line for line in report.lines if line.startswith("FAIL")]
    assert failures == []
    assert report.failed == 0
    assert report.passed + report.skipped == len(vectors)
    # Every fundamental pattern, with and without psk, is in the file and supported.
    supported = {_pattern_of(v) for v in vectors if not _unsupported(v)}
    assert set(FUNDAMENTAL) <= supported
    assert any("psk" in p for p in supported)


def _unsupported(vector: dict[str, Any]) -> bool:
    try:
        parse_protocol_name(vector["protocol_name"])
    except UnsupportedProtocolError:
        return True
    return False


def _run_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshpipe.noise", "--vectors", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_reports_all_passed(vectors: list[dict[str, Any]]) -> None:
    proc = _run_cli(VECTORS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"(\d+) passed, 0 failed", last)
    assert m is not None, last
    assert int(m.group(1)) == sum(not _unsupported(v) for v in vectors)


def test_cli_counts_failures_and_skips(tmp_path: Path, vectors: list[dict[str, Any]]) -> None:
    good = next(v for v in vectors if v["protocol_name"] == PROTOCOL_IK)
    bad = dict(good, handshake_hash="00" * 64)
    odd = dict(good, protocol_name="Noise_IK_448_AESGCM_SHA512")
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"vectors": [good, bad, odd]}))
    proc = _run_cli(path)
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "1 passed, 1 failed"
    assert any("skipped 1" in ln for ln in lines)
    assert proc.returncode == 1

    only_skipped = tmp_path / "s.json"
    only_skipped.write_text(json.dumps({"vectors": [odd]}))
    proc = _run_cli(only_skipped)
    assert proc.stdout.strip().splitlines()[-1] == "0 passed, 0 failed"
    assert proc.returncode != 0  # nothing checked is not a pass


def test_vector_without_handshake_hash_is_checked(vectors: list[dict[str, Any]]) -> None:
    """handshake_hash is optional in the format: a vector without it still passes, and
    a damaged message in such a vector still fails."""
    good = next(v for v in vectors if v["protocol_name"] == PROTOCOL_IK)
    bare = {k: v for k, v in good.items() if k != "handshake_hash"}
    assert "handshake_hash" in good and "handshake_hash" not in bare
    check_vector(bare)
    report = check_vectors([bare])
    assert (report.passed, report.failed) == (1, 0)
    msgs = [dict(m) for m in bare["messages"]]
    last = msgs[-1]["ciphertext"]
    msgs[-1]["ciphertext"] = last[:-2] + ("00" if last[-2:] != "00" else "01")
    with pytest.raises(VectorMismatch):
        check_vector(dict(bare, messages=msgs))


# -- handshakes ----------------------------------------------------------------------


def _ik_pair(
    prologue: bytes = b"meshpipe",
) -> tuple[HandshakeState, HandshakeState, KeyPair, KeyPair]:
    i_s, r_s = KeyPair.generate(), KeyPair.generate()
    init = HandshakeState(PROTOCOL_IK, True, prologue=prologue, s=i_s, rs=r_s.public)
    resp = HandshakeState(PROTOCOL_IK, False, prologue=prologue, s=r_s)
    return init, resp, i_s, r_s


def _complete(init: HandshakeState, resp: HandshakeState) -> None:
    while not (init.complete and resp.complete):
        tx, rx = (init, resp) if init.is_my_turn else (resp, init)
        assert rx.read_message(tx.write_message(b"hello")) == b"hello"


def test_tampered_handshake_message_raises_decrypt_error() -> None:
    init, resp, _, _ = _ik_pair()
    msg1 = init.write_message(b"payload")
    for pos in (40, len(msg1) - 1):  # inside the encrypted s, inside the payload tag
        bad = bytearray(msg1)
        bad[pos] ^= 0x01
        with pytest.raises(DecryptError):
            resp.read_message(bytes(bad))
    # Reads are atomic: the genuine message still works after the forgeries.
    assert resp.read_message(msg1) == b"payload"
    msg2 = bytearray(resp.write_message(b"reply"))
    msg2[-1] ^= 0x80
    with pytest.raises(DecryptError):
        init.read_message(bytes(msg2))


def test_tampered_transport_message_raises_decrypt_error() -> None:
    init, resp, _, _ = _ik_pair()
    _complete(init, resp)
    (i_send, _), (_, r_recv) = init.transport(), resp.transport()
    ct = bytearray(i_send.encrypt_with_ad(b"ad", b"data"))
    ct[0] ^= 0x01
    with pytest.raises(DecryptError):
        r_recv.decrypt_with_ad(b"ad", bytes(ct))
    assert r_recv.nonce == 0  # a forgery does not use up a nonce
    with pytest.raises(DecryptError):
        r_recv.decrypt_with_ad(b"ad", b"short")


def test_wrong_responder_key_fails() -> None:
    r_s = KeyPair.generate()
    init = HandshakeState(PROTOCOL_IK, True, s=KeyPair.generate(), rs=KeyPair.generate().public)
    resp = HandshakeState(PROTOCOL_IK, False, s=r_s)
    with pytest.raises(DecryptError):
        resp.read_message(init.write_message())


def test_out_of_turn_calls_raise() -> None:
    init, resp, _, _ = _ik_pair()
    with pytest.raises(HandshakeStateError):
        init.read_message(b"\x00" * 96)
    with pytest.raises(HandshakeStateError):
        resp.write_message(b"")
    with pytest.raises(HandshakeStateError):
        init.split()
    msg1 = init.write_message()
    with pytest.raises(HandshakeStateError):
        init.write_message()
    resp.read_message(msg1)
    init.read_message(resp.write_message())
    assert init.complete and resp.complete
    for side in (init, resp):
        with pytest.raises(HandshakeStateError):
            side.write_message()
        with pytest.raises(HandshakeStateError):
            side.read_message(b"")


def test_malformed_messages_raise_malformed() -> None:
    _, resp, _, _ = _ik_pair()
    # 9 is the X25519 base point: a valid e, so parsing gets as far as the lengths.
    for n in (0, 10, 31, 32 + 47, 32 + 48 + 15):
        with pytest.raises(MalformedMessageError):
            resp.read_message(b"\x09" * n)
    with pytest.raises(MalformedMessageError):
        resp.read_message(bytes(70000))


def test_low_order_ephemeral_is_rejected() -> None:
    # e = 0 is a low-order point: any DH with it gives zero.
    ik = HandshakeState(PROTOCOL_IK, False, s=KeyPair.generate())
    with pytest.raises(InvalidKeyError):
        ik.read_message(bytes(32 + 48 + 16))  # fails at "es", before any decryption
    # NN message 1 carries no DH, so the zero point only fails at "ee" on the reply.
    nn = HandshakeState("Noise_NN_" + SUITE, False)
    assert nn.read_message(bytes(32) + b"x") == b"x"
    with pytest.raises(InvalidKeyError):
        nn.write_message()
    assert nn.is_my_turn  # a failed write leaves the state as it was


def test_key_configuration_errors() -> None:
    with pytest.raises(UnsupportedProtocolError):
        HandshakeState("Noise_IK_448_ChaChaPoly_BLAKE2b", True)
    with pytest.raises(UnsupportedProtocolError):
        HandshakeState("Noise_ZZ_" + SUITE, True)
    with pytest.raises(UnsupportedProtocolError):
        HandshakeState("Noise_XXfallback_" + SUITE, True)
    with pytest.raises(InvalidKeyError):  # IK initiator must know the responder's key
        HandshakeState(PROTOCOL_IK, True, s=KeyPair.generate())
    with pytest.raises(InvalidKeyError):  # and needs its own static key
        HandshakeState(PROTOCOL_IK, True, rs=KeyPair.generate().public)
    with pytest.raises(InvalidKeyError):  # XX sends rs in a message; giving it is wrong
        HandshakeState("Noise_XX_" + SUITE, True, s=KeyPair.generate(), rs=bytes(32))
    with pytest.raises(InvalidKeyError):
        HandshakeState("Noise_NNpsk0_" + SUITE, True)
    with pytest.raises(InvalidKeyError):
        HandshakeState("Noise_NNpsk0_" + SUITE, True, psks=[b"short"])
    with pytest.raises(InvalidKeyError):
        KeyPair.from_private(b"x" * 31)


@pytest.mark.parametrize("pattern", [*FUNDAMENTAL, "NNpsk0+psk2", "IKpsk2", "XX1", "I1K1"])
def test_every_pattern_completes_with_random_keys(pattern: str) -> None:
    parsed = parse_protocol_name(f"Noise_{pattern}_{SUITE}")
    i_s, r_s = KeyPair.generate(), KeyPair.generate()
    psks = [bytes(range(32))] * sum(m.count("psk") for m in parsed.messages)
    init = HandshakeState(
        f"Noise_{pattern}_{SUITE}",
        True,
        s=i_s,
        rs=r_s.public if "s" in parsed.responder_pre else None,
        psks=psks,
    )
    resp = HandshakeState(
        f"Noise_{pattern}_{SUITE}",
        False,
        s=r_s,
        rs=i_s.public if "s" in parsed.initiator_pre else None,
        psks=psks,
    )
    _complete(init, resp)
    assert init.get_handshake_hash() == resp.get_handshake_hash()
    i_send, _ = init.transport()
    _, r_recv = resp.transport()
    assert r_recv.decrypt_with_ad(b"", i_send.encrypt_with_ad(b"", b"x")) == b"x"


_FUZZ_PATTERNS = ["IK", "NN", "XX", "NK", "KK", "IKpsk2", "N", "X"]


def _fresh_responder(pattern: str) -> HandshakeState:
    parsed = parse_protocol_name(f"Noise_{pattern}_{SUITE}")
    return HandshakeState(
        f"Noise_{pattern}_{SUITE}",
        False,
        s=KeyPair.from_private(b"\x01" * 32),
        rs=KeyPair.from_private(b"\x02" * 32).public if "s" in parsed.initiator_pre else None,
        psks=[b"\x03" * 32] * sum(m.count("psk") for m in parsed.messages),
    )


@settings(max_examples=300, deadline=None)
@given(pattern=st.sampled_from(_FUZZ_PATTERNS), data=st.binary(max_size=300))
def test_random_bytes_raise_only_noise_errors(pattern: str, data: bytes) -> None:
    resp = _fresh_responder(pattern)
    try:
        resp.read_message(data)
    except NoiseError:
        assert not resp.is_my_turn and not resp.complete  # unchanged: still waiting
        return
    # Some patterns (NN) accept any long-enough first message; that is not an error.
    assert resp.complete or resp.is_my_turn


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=96, max_size=200))
def test_random_bytes_with_valid_length_fail_authentication(data: bytes) -> None:
    with pytest.raises((DecryptError, InvalidKeyError)):
        _fresh_responder("IK").read_message(data)


# -- meshpipe identities -------------------------------------------------------------


def test_ik_between_meshpipe_identities() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    init = HandshakeState(
        PROTOCOL_IK,
        True,
        prologue=b"meshpipe session v1",
        s=alice.x25519_private(),
        rs=bob.sid.x25519_public(),
    )
    resp = HandshakeState(
        PROTOCOL_IK, False, prologue=b"meshpipe session v1", s=bob.x25519_private()
    )
    assert resp.read_message(init.write_message(b"hi bob")) == b"hi bob"
    # The responder learns who called: the caller's SID maps to this key.
    assert resp.remote_static == alice.sid.x25519_public()
    assert init.read_message(resp.write_message(b"hi alice")) == b"hi alice"
    assert init.complete and resp.complete
    assert init.get_handshake_hash() == resp.get_handshake_hash()

    a_send, a_recv = init.transport()
    b_send, b_recv = resp.transport()
    for n in range(3):
        assert b_recv.decrypt_with_ad(b"", a_send.encrypt_with_ad(b"", b"ping%d" % n)) == (
            b"ping%d" % n
        )
        assert a_recv.decrypt_with_ad(b"", b_send.encrypt_with_ad(b"", b"pong%d" % n)) == (
            b"pong%d" % n
        )
    # Explicit nonces, as the session layer sends them: out of order is fine.
    cts = {n: a_send.encrypt_with_nonce(n, b"hdr", b"m%d" % n) for n in (10, 7, 1000)}
    for n in (1000, 10, 7):
        assert b_recv.decrypt_with_nonce(n, b"hdr", cts[n]) == b"m%d" % n
    with pytest.raises(DecryptError):
        b_recv.decrypt_with_nonce(11, b"hdr", cts[10])
    with pytest.raises(DecryptError):
        b_recv.decrypt_with_nonce(10, b"other", cts[10])


# -- CipherState -----------------------------------------------------------------------


def test_cipherstate_nonce_limits() -> None:
    cs = CipherState(bytes(32))
    cs.set_nonce(MAX_NONCE - 1)
    cs.encrypt_with_ad(b"", b"last")
    with pytest.raises(NonceError):
        cs.encrypt_with_ad(b"", b"too many")
    with pytest.raises(NonceError):
        cs.encrypt_with_nonce(MAX_NONCE, b"", b"reserved")
    with pytest.raises(NonceError):
        cs.encrypt_with_nonce(-1, b"", b"negative")
    with pytest.raises(HandshakeStateError):
        CipherState().encrypt_with_nonce(0, b"", b"no key")
    assert CipherState().encrypt_with_ad(b"", b"clear") == b"clear"  # spec: no key, no-op


def test_rekey_follows_the_spec() -> None:
    from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

    key = bytes(range(32))
    a, b = CipherState(key), CipherState(key)
    a.encrypt_with_ad(b"", b"one")
    a.rekey()
    nonce = b"\x00" * 4 + (2**64 - 1).to_bytes(8, "little")
    want = crypto_aead_chacha20poly1305_ietf_encrypt(bytes(32), b"", nonce, key)[:32]
    assert a.key == want
    assert a.nonce == 1  # rekey leaves the nonce alone
    b.decrypt_with_ad(b"", CipherState(key).encrypt_with_ad(b"", b"one"))
    b.rekey()
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"two")) == b"two"


def test_errors_are_meshpipe_errors() -> None:
    assert issubclass(NoiseError, MeshpipeError)
    for cls in (DecryptError, HandshakeStateError, MalformedMessageError, InvalidKeyError):
        assert issubclass(cls, NoiseError)
