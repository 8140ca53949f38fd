"""Exit policy: which resolved destinations an exit node may connect to.

Evaluated on the *resolved* address (after DNS at the exit), so a name that
resolves to loopback is refused like the address itself. Order of the checks:

1. a port outside 1..65535 (``bad_port``);
2. built-in refusals that no allow list lifts: loopback (127.0.0.0/8, ::1),
   unspecified, link-local and multicast addresses (IPv4-mapped IPv6 is unwrapped
   first, so ``::ffff:127.0.0.1`` is loopback too);
3. the exit's own addresses (given by the caller) - lifted only by naming that
   exact host (``/32`` or ``/128``) in ``allow_networks``: an exit must not reach
   services bound to its own interfaces unless someone asked for it in so many words;
4. ``deny_networks``;
5. ``allow_networks`` when not empty (otherwise every remaining network);
6. ``allow_ports`` when not empty (otherwise every port).

Every refusal maps to SOCKS reply 2, "connection not allowed by ruleset".
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshpipe.errors import MeshpipeError
from meshpipe.services.socks5 import REP_HOST_UNREACHABLE, REP_NOT_ALLOWED, REP_SUCCEEDED

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ExitPolicyError(MeshpipeError, ValueError):
    """A network or port range in an exit policy is malformed."""


@dataclass(frozen=True, slots=True)
class PortRange:
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi <= 65535:
            raise ExitPolicyError(
                f"bad port range {self.lo}-{self.hi} (want 1 <= lo <= hi <= 65535)"
            )

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi

    @classmethod
    def parse(cls, value: object) -> PortRange:
        """``443``, ``"443"`` or ``"8000-8100"``."""
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value, value)
        if not isinstance(value, str):
            raise ExitPolicyError(f"port range must be a number or 'LO-HI', got {value!r}")
        lo_text, sep, hi_text = value.strip().partition("-")
        try:
            lo = int(lo_text, 10)
            hi = int(hi_text, 10) if sep else lo
        except ValueError:
            raise ExitPolicyError(
                f"port range must be a number or 'LO-HI', got {value!r}"
            ) from None
        return cls(lo, hi)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


def parse_network(value: object) -> IPNetwork:
    """A network in CIDR form (a bare address is a single host); host bits must be zero."""
    if not isinstance(value, str):
        raise ExitPolicyError(f"network must be a string like '198.18.0.0/15', got {value!r}")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ExitPolicyError(f"bad network {value!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # stable: "allowed", "bad_port", "loopback", "unspecified", "link_local",
    # "multicast", "own_address", "denied_network", "network_not_allowed", "port_not_allowed",
    # "no_address" (filter() got nothing to try: host unreachable)
    reply: int  # the SOCKS5 reply code to give when refusing (REP_SUCCEEDED when allowed)


ALLOWED = Decision(True, "allowed", REP_SUCCEEDED)


def _refuse(reason: str) -> Decision:
    return Decision(False, reason, REP_NOT_ALLOWED)


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _builtin(addr: IPAddress) -> str | None:
    if addr.is_loopback:
        return "loopback"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_link_local:
        return "link_local"
    if addr.is_multicast or addr == ipaddress.IPv4Address("255.255.255.255"):
        return "multicast"
    return None


class ExitPolicy:
    def __init__(
        self,
        allow_networks: Iterable[str | IPNetwork] = (),
        deny_networks: Iterable[str | IPNetwork] = (),
        allow_ports: Iterable[int | str | PortRange] = (),
        own_addresses: Iterable[str | IPAddress] = (),
    ) -> None:
        self.allow_networks = tuple(_net(n) for n in allow_networks)
        self.deny_networks = tuple(_net(n) for n in deny_networks)
        self.allow_ports = tuple(
            p if isinstance(p, PortRange) else PortRange.parse(p) for p in allow_ports
        )
        self.own_addresses: frozenset[IPAddress] = frozenset(
            _unmap(ipaddress.ip_address(a) if isinstance(a, str) else a) for a in own_addresses
        )

    def check(self, address: str | IPAddress, port: int) -> Decision:
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            return _refuse("bad_port")
        try:
            addr = _unmap(ipaddress.ip_address(address) if isinstance(address, str) else address)
        except ValueError:
            raise ExitPolicyError(f"not an IP address: {address!r} (resolve names first)") from None
        builtin = _builtin(addr)
        if builtin is not None:
            return _refuse(builtin)
        if addr in self.own_addresses and not any(
            n.num_addresses == 1 and addr in n for n in self.allow_networks
        ):
            return _refuse("own_address")
        if any(addr in n for n in self.deny_networks):
            return _refuse("denied_network")
        if self.allow_networks and not any(addr in n for n in self.allow_networks):
            return _refuse("network_not_allowed")
        if self.allow_ports and not any(port in r for r in self.allow_ports):
            return _refuse("port_not_allowed")
        return ALLOWED

    def filter(
        self, addresses: Sequence[str | IPAddress], port: int
    ) -> tuple[list[IPAddress], Decision]:
        """The resolved addresses one may try (in order), and the decision to report:
        ALLOWED if any is allowed, else the refusal of the first address."""
        ok: list[IPAddress] = []
        first: Decision | None = None
        for a in addresses:
            d = self.check(a, port)
            if d.allowed:
                ok.append(ipaddress.ip_address(a) if isinstance(a, str) else a)
            elif first is None:
                first = d
        if ok:
            return ok, ALLOWED
        return ok, first if first is not None else Decision(
            False, "no_address", REP_HOST_UNREACHABLE
        )


def _net(n: str | IPNetwork) -> IPNetwork:
    return n if isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network) else parse_network(n)


__all__ = ["ALLOWED", "Decision", "ExitPolicy", "ExitPolicyError", "PortRange", "parse_network"]
