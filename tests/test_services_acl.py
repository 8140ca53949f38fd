"""meshpipe.services.acl: whole SIDs or "any"; prefixes refused; closed by default."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshpipe.identity import Identity
from meshpipe.services.acl import ANY, Acl, AclError, parse_entry

A = Identity.from_seed(b"a" * 32).sid
B = Identity.from_seed(b"b" * 32).sid


def test_default_is_closed() -> None:
    assert not Acl().allows(bytes(A))
    assert not Acl.parse(None).allows(bytes(A))
    assert not Acl.parse([]).allows(bytes(A))


def test_any_is_explicit_and_open() -> None:
    acl = Acl.parse("any")
    assert acl.allows(bytes(A)) and acl.allows(bytes(B))
    assert acl.as_config() == ANY
    assert Acl.parse(" ANY ").open_to_all


def test_full_sids_only_those() -> None:
    acl = Acl.parse([str(A)])
    assert acl.allows(bytes(A))
    assert acl.allows(A)  # a Sid is bytes
    assert not acl.allows(bytes(B))
    assert acl.as_config() == [str(A)]
    assert Acl.parse(str(A).upper()).allows(bytes(A))  # case does not matter


@pytest.mark.parametrize("n", [8, 12, 63])
def test_prefix_is_refused_with_a_clear_error(n: int) -> None:
    with pytest.raises(AclError, match="prefix"):
        Acl.parse([str(A)[:n]])


@pytest.mark.parametrize("bad", ["", "nothex" * 11, str(A) + "00", 42, None, "any"], ids=repr)
def test_bad_entries(bad: object) -> None:
    with pytest.raises(AclError):
        parse_entry(bad)


def test_any_inside_a_list_is_refused() -> None:
    with pytest.raises(AclError, match="any"):
        Acl.parse([str(A), "any"])


def test_wrong_type() -> None:
    with pytest.raises(AclError):
        Acl.parse(3)


def test_of_refuses_non_sid_bytes() -> None:
    with pytest.raises(ValueError):
        Acl.of([b"short"])


@given(st.binary(min_size=0, max_size=40))
def test_allows_never_raises_and_only_listed(sid: bytes) -> None:
    acl = Acl.of([bytes(A)])
    assert acl.allows(sid) == (sid == bytes(A))
    assert Acl.any().allows(sid) == (len(sid) == 32)


def test_check_gives_the_denial_event() -> None:
    acl = Acl.of([bytes(A)])
    assert acl.check(bytes(A), "web") is None
    ev = acl.check(bytes(B), "web")
    assert ev is not None and ev.name == "acl.denied"
    assert ev.fields == {"sid": str(B), "service": "web"}
