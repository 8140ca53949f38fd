"""meshpipe.identity: key files, SID text form and prefixes, overlay IPv6, signatures."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshpipe.errors import KeyFileError, SidError
from meshpipe.identity import KEY_FILE_TAG, MIN_PREFIX, Identity, Sid, overlay_ipv6, resolve_sid

FD00 = ipaddress.IPv6Network("fd00::/8")


def seeded(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def key_file(tmp_path: Path) -> tuple[Path, Identity]:
    ident = Identity.generate()
    path = tmp_path / "node.key"
    ident.write(str(path))
    return path, ident


# -- key files -------------------------------------------------------------------------------


def test_key_file_round_trip(key_file: tuple[Path, Identity]) -> None:
    path, ident = key_file
    loaded = Identity.load(str(path))
    assert loaded.sid == ident.sid
    assert bytes(loaded.signing_key) == bytes(ident.signing_key)


def test_key_file_mode_0600(key_file: tuple[Path, Identity]) -> None:
    path, _ = key_file
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.usefixtures("umask_zero")
def test_key_file_mode_0600_even_with_umask_zero(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    Identity.generate().write(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    Identity.load(str(path))


def test_write_refuses_to_overwrite(key_file: tuple[Path, Identity]) -> None:
    path, _ = key_file
    before = path.read_text()
    with pytest.raises(KeyFileError, match="already exists"):
        Identity.generate().write(str(path))
    assert path.read_text() == before


def test_write_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot create"):
        Identity.generate().write(str(tmp_path / "no" / "node.key"))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o620])
def test_readable_by_others_is_refused(key_file: tuple[Path, Identity], mode: int) -> None:
    path, _ = key_file
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600") as info:
        Identity.load(str(path))
    assert str(path) in str(info.value)
    assert f"{mode:04o}" in str(info.value)


def test_owner_only_modes_are_accepted(key_file: tuple[Path, Identity]) -> None:
    path, ident = key_file
    path.chmod(0o400)
    assert Identity.load(str(path)).sid == ident.sid


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read key file"):
        Identity.load(str(tmp_path / "nope.key"))


def _rewrite(path: Path, text: str | bytes) -> None:
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    path.chmod(0o600)


def _flip(ch: str) -> str:
    return "0" if ch != "0" else "1"


def _key_line(path: Path) -> tuple[str, str, str]:
    (line,) = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    tag, seed, sid = line.split()
    return tag, seed, sid


def _corruptions(path: Path) -> dict[str, str | bytes]:
    text = path.read_text()
    tag, seed, sid = _key_line(path)
    other = str(seeded(9).sid)
    return {
        "empty": "",
        "comment-only": "# nothing here\n",
        "truncated-mid-seed": text[: text.index(seed) + 20],
        "truncated-before-sid": text[: text.index(sid)],
        "truncated-mid-sid": text[: text.index(sid) + 30],
        "short-seed": f"{tag} {seed[:-2]} {sid}\n",
        "flipped-seed-char": f"{tag} {_flip(seed[0])}{seed[1:]} {sid}\n",
        "flipped-seed-last-char": f"{tag} {seed[:-1]}{_flip(seed[-1])} {sid}\n",
        "flipped-sid-char": f"{tag} {seed} {sid[:10]}{_flip(sid[10])}{sid[11:]}\n",
        "mismatched-sid": f"{tag} {seed} {other}\n",
        "uppercase-seed": f"{tag} {seed.upper()} {sid}\n" if seed != seed.upper() else "x",
        "non-hex-seed": f"{tag} {'g' * 64} {sid}\n",
        "wrong-tag": f"meshpipe-rsa-v0 {seed} {sid}\n",
        "two-keys": text + text,
        "extra-field": f"{tag} {seed} {sid} extra\n",
        "garbage-text": "hello world\n",
        "garbage-bytes": bytes(range(256)) * 4,
        "nul-bytes": b"\0" * 200,
    }


CORRUPTION_IDS = [
    "empty",
    "comment-only",
    "truncated-mid-seed",
    "truncated-before-sid",
    "truncated-mid-sid",
    "short-seed",
    "flipped-seed-char",
    "flipped-seed-last-char",
    "flipped-sid-char",
    "mismatched-sid",
    "uppercase-seed",
    "non-hex-seed",
    "wrong-tag",
    "two-keys",
    "extra-field",
    "garbage-text",
    "garbage-bytes",
    "nul-bytes",
]


@pytest.mark.parametrize("which", CORRUPTION_IDS)
def test_damaged_key_file_is_refused(key_file: tuple[Path, Identity], which: str) -> None:
    path, _ = key_file
    _rewrite(path, _corruptions(path)[which])
    with pytest.raises(KeyFileError) as info:
        Identity.load(str(path))
    assert str(path) in str(info.value)


def test_corruption_list_is_complete(key_file: tuple[Path, Identity]) -> None:
    path, _ = key_file
    assert sorted(_corruptions(path)) == sorted(CORRUPTION_IDS)


def test_key_file_format(key_file: tuple[Path, Identity]) -> None:
    path, ident = key_file
    tag, seed, sid = _key_line(path)
    assert tag == KEY_FILE_TAG
    assert seed == bytes(ident.signing_key).hex()
    assert sid == str(ident.sid)


def test_parse_tolerates_comments_and_blank_lines() -> None:
    ident = seeded(1)
    text = "\n# a comment\n\n" + ident.dump() + "\n# trailing\n"
    assert Identity.parse(text).sid == ident.sid


# -- SID text form ---------------------------------------------------------------------------


def test_sid_text_round_trip() -> None:
    sid = Identity.generate().sid
    text = str(sid)
    assert len(text) == 64 and text == text.lower()
    assert Sid.parse(text) == sid
    assert Sid.parse(text.upper()) == sid
    assert Sid.parse(f"  {text}\n") == sid
    assert isinstance(Sid.parse(text), Sid)
    assert sid.short == text[:8]
    assert sid.short in repr(sid)


@pytest.mark.parametrize(
    "text", ["", "00", "0" * 63, "0" * 65, "g" * 64, "0x" + "0" * 62, "0" * 32 + " " + "0" * 31]
)
def test_sid_parse_rejects(text: str) -> None:
    with pytest.raises(SidError):
        Sid.parse(text)


@pytest.mark.parametrize("n", [0, 31, 33, 64])
def test_sid_needs_32_bytes(n: int) -> None:
    with pytest.raises(SidError):
        Sid(b"\x01" * n)


@given(st.text())
def test_sid_parse_raises_only_sid_error(text: str) -> None:
    try:
        sid = Sid.parse(text)
    except SidError:
        return
    assert str(sid) == text.strip().lower()


@given(st.text(alphabet="0123456789abcdefABCDEF \n\tx", max_size=70))
def test_sid_parse_raises_only_sid_error_near_hex(text: str) -> None:
    with contextlib.suppress(SidError):
        Sid.parse(text)


@given(st.binary(min_size=32, max_size=32))
def test_sid_round_trip_any_bytes(raw: bytes) -> None:
    sid = Sid(raw)
    assert Sid.parse(str(sid)) == sid


# -- prefixes ---------------------------------------------------------------------------------


def _sid(hex_text: str) -> Sid:
    return Sid(bytes.fromhex(hex_text.ljust(64, "0")))


KNOWN = [
    _sid("abcdef0011"),
    _sid("abcdef0022"),
    _sid("12345678"),
]


def test_resolve_unique_prefix() -> None:
    assert resolve_sid("abcdef0011", KNOWN) == KNOWN[0]
    assert resolve_sid("12345678", KNOWN) == KNOWN[2]
    assert resolve_sid("ABCDEF0022", KNOWN) == KNOWN[1]
    assert isinstance(resolve_sid("12345678", KNOWN), Sid)


def test_resolve_full_sid() -> None:
    assert resolve_sid(str(KNOWN[1]), KNOWN) == KNOWN[1]


def test_resolve_ambiguous_prefix() -> None:
    with pytest.raises(SidError, match="ambiguous: 2 nodes"):
        resolve_sid("abcdef00", KNOWN)


def test_resolve_same_sid_twice_is_not_ambiguous() -> None:
    assert resolve_sid("12345678", [*KNOWN, bytes(KNOWN[2])]) == KNOWN[2]


@pytest.mark.parametrize("prefix", ["", "1", "1234567", "abcdef0"])
def test_resolve_too_short(prefix: str) -> None:
    assert len(prefix) < MIN_PREFIX
    with pytest.raises(SidError, match=f"at least {MIN_PREFIX}"):
        resolve_sid(prefix, KNOWN)


def test_resolve_unknown() -> None:
    with pytest.raises(SidError, match="no known node"):
        resolve_sid("ffffffff", KNOWN)
    with pytest.raises(SidError, match="no known node"):
        resolve_sid("12345678", [])


def test_resolve_not_hex() -> None:
    with pytest.raises(SidError, match="not hex"):
        resolve_sid("abcdefgh", KNOWN)


# -- overlay IPv6 -----------------------------------------------------------------------------


def test_overlay_ipv6_in_fd00_8() -> None:
    for n in range(20):
        addr = seeded(n).sid.ipv6()
        assert addr in FD00
        assert str(addr).startswith("fd")


def test_overlay_ipv6_deterministic() -> None:
    sid = seeded(3).sid
    assert sid.ipv6() == sid.ipv6() == overlay_ipv6(bytes(sid)) == seeded(3).sid.ipv6()
    assert Sid.parse(str(sid)).ipv6() == sid.ipv6()


def test_overlay_ipv6_differs_between_sids() -> None:
    addrs = {seeded(n).sid.ipv6() for n in range(50)}
    assert len(addrs) == 50


def test_overlay_ipv6_is_hashed_not_copied() -> None:
    sid = seeded(4).sid
    assert sid.ipv6().packed[1:] != bytes(sid)[:15]


# -- signatures -------------------------------------------------------------------------------


def test_sign_and_verify() -> None:
    ident = seeded(5)
    msg = b"route announcement"
    sig = ident.sign(msg)
    assert len(sig) == 64
    assert ident.sid.verify(msg, sig)
    assert not ident.sid.verify(msg + b"!", sig)
    assert not ident.sid.verify(msg, bytes([sig[0] ^ 1]) + sig[1:])
    assert not ident.sid.verify(msg, sig[:-1])
    assert not ident.sid.verify(msg, b"")
    assert not seeded(6).sid.verify(msg, sig)


def test_signatures_are_deterministic() -> None:
    assert seeded(7).sign(b"x") == seeded(7).sign(b"x")


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=64), st.binary(max_size=80))
def test_verify_never_raises(raw: bytes, msg: bytes, sig: bytes) -> None:
    assert Sid(raw).verify(msg, sig) in (True, False)


def test_x25519_keys_match() -> None:
    ident = seeded(8)
    priv, pub = ident.x25519_keypair()
    assert bytes(priv) == ident.x25519_private()
    assert bytes(pub) == ident.sid.x25519_public()
    assert len(ident.sid.x25519_public()) == 32
