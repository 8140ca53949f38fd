"""The node's TOML configuration: loading, strict validation and the starter file.

Every problem is a :class:`~meshpipe.errors.ConfigError` naming the file, the dotted
key (``interface[0].listen``) and the reason. Unknown sections and keys are errors,
not warnings: a misspelt key would otherwise silently fall back to its default.

Relative paths in the file resolve against the directory the file lives in, so a
node directory made by ``meshpipe init`` can be moved as a whole.

Adding a section: write a frozen dataclass, one small ``_section_*`` validator that
takes a :class:`_Table` and returns it, one entry in ``_SECTIONS`` and one field on
:class:`Config`.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, TypeVar

from meshpipe.errors import ConfigError, KeyFileError
from meshpipe.identity import Identity
from meshpipe.link.kiss import RADIO_HEADER_LEN
from meshpipe.link.recovery import MODES as HOP_RECOVERY_MODES
from meshpipe.link.recovery import OVERHEAD as HOP_RECOVERY_OVERHEAD
from meshpipe.msp import MspParams
from meshpipe.node import MIN_MTU as CORE_MIN_MTU
from meshpipe.node import Limits as CoreLimits
from meshpipe.services.acl import Acl, AclError
from meshpipe.services.discovery import MAX_LIFETIME as MAX_SERVICE_LIFETIME
from meshpipe.services.discovery import DiscoveryLimits, ServiceError, check_name
from meshpipe.services.exit_policy import (
    ExitPolicy,
    ExitPolicyError,
    IPAddress,
    IPNetwork,
    PortRange,
    parse_network,
)
from meshpipe.tunnel import DEFAULT_MTU as TUNNEL_DEFAULT_MTU
from meshpipe.tunnel import MIN_MTU as TUNNEL_MIN_MTU
from meshpipe.tunnel import OVERLAY as TUNNEL_OVERLAY

DEFAULT_CONTROL_SOCKET: Final = "/run/meshpipe/control.sock"
DEFAULT_LISTEN: Final = "127.0.0.1:7700"
DEFAULT_MULTICAST_GROUP: Final = "239.255.77.77"
DEFAULT_MTU: Final = 1400
MIN_MTU: Final = 576
MAX_MTU: Final = 65000
MAX_WORKERS: Final = 1024
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
INTERFACE_KINDS: Final = ("udp", "radio")
# Radio: the MTU counts the link header and the mesh frame (see meshpipe.link.kiss);
# the smallest one still carries a signed hello with one IHU behind the header.
RADIO_DEFAULT_MTU: Final = 255
RADIO_MIN_MTU: Final = CORE_MIN_MTU + RADIO_HEADER_LEN
RADIO_MAX_MTU: Final = 4096
# The rates termios can set on Linux.
RADIO_BAUDS: Final = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800)
RADIO_QUEUE_SECONDS: Final = 2.0  # default send queue: this much air time at rate_bps
CONFIG_FILE: Final = "meshpipe.toml"
KEY_FILE: Final = "node.key"
# sun_path holds 108 bytes on Linux; keep one for the terminating NUL.
MAX_SOCKET_PATH: Final = 107
MAX_NAME_LEN: Final = 63  # one DNS label (node records, meshpipe.noderecord)

_IFACE_NAME = re.compile(r"[a-z0-9_-]{1,15}")
_PORT = re.compile(r"[0-9]{1,5}")


# -- the parsed configuration ----------------------------------------------------------


@dataclass(frozen=True)
class NodeSection:
    key: str  # absolute path of the key file (loaded by Identity.load, not here)
    control_socket: str = DEFAULT_CONTROL_SOCKET  # absolute path
    name: str | None = None
    log_level: str = "info"


@dataclass(frozen=True)
class WorkersSection:
    per_interface: int = 1  # "auto" is resolved to the number of cores
    crypto: int = 1
    # UDP segmentation offload and its receive side (GSO/GRO) in the interface workers.
    udp_offload: bool = True


@dataclass(frozen=True)
class TimingSection:
    """Protocol timers in seconds."""

    hello_interval: float = 1.0
    neighbour_timeout: float = 4.0
    update_interval: float = 4.0
    route_expiry: float = 14.0


# A radio's own timer defaults: idle hellos and route dumps between two radio
# nodes stay near 60 bytes/s, about 2.5% of 19,200 bit/s (budget: under 5%).
# An idle radio link carries at most 1% of its rate in control traffic (19,200 bit/s:
# 24 bytes/s for two nodes); a signed hello is about 190 bytes on the air.
RADIO_TIMING: Final = TimingSection(
    hello_interval=40.0, neighbour_timeout=140.0, update_interval=90.0, route_expiry=300.0
)
_TIMING_KEYS: Final = ("hello_interval", "neighbour_timeout", "update_interval", "route_expiry")


@dataclass(frozen=True)
class InterfaceConfig:
    """One link. ``listen`` .. ``multicast_group`` are for kind "udp", ``device`` ..
    ``queue_bytes`` for kind "radio" (``listen`` is ("", 0) on a radio).

    ``timing`` is this interface's own timers, or None to use [timing]: set by the
    timer keys in its table, and always set on a radio (RADIO_TIMING defaults).
    """

    name: str
    kind: str
    listen: tuple[str, int] = ("", 0)
    peers: tuple[tuple[str, int], ...] = ()
    discovery: bool = False
    multicast_group: str = DEFAULT_MULTICAST_GROUP
    mtu: int = DEFAULT_MTU
    device: str = ""  # absolute path of the serial device
    baud: int = 0
    rate_bps: int = 0  # air rate budget, bit/s
    queue_bytes: int = 0  # send queue limit
    timing: TimingSection | None = None
    # Per-hop recovery (meshpipe.link.recovery): "auto", "on" or "off". Resolved here:
    # "auto" becomes "off" where it cannot work (several UDP workers share the port, so
    # acks may reach another worker; a radio MTU with no room for the header).
    hop_recovery: str = "auto"

    @property
    def link_overhead(self) -> int:
        """Bytes of the MTU the link framing takes before the core's frame."""
        radio = RADIO_HEADER_LEN if self.kind == "radio" else 0
        return radio + (0 if self.hop_recovery == "off" else HOP_RECOVERY_OVERHEAD)


SERVICE_KINDS: Final = ("tcp", "udp")
# MSP ports given to [[service]] tables without a port: hashed from the name into this
# range (probing upwards on a clash), so a node offers a service on the same port on
# every start and a forwarder can be told the port once.
AUTO_SERVICE_PORTS: Final = range(1024, 49152)


@dataclass(frozen=True)
class ServiceConfig:
    """One ``[[service]]``: a local TCP target offered over MSP as ``name``."""

    name: str
    to: tuple[str, int]
    port: int  # MSP port (given, or auto-assigned from the name)
    allow: Acl = field(default_factory=Acl)  # closed unless the file says otherwise
    hidden: bool = False  # served but not announced by discovery
    kind: str = "tcp"


@dataclass(frozen=True)
class ExitSection:
    """``[exit]``: this node as a SOCKS5 exit."""

    enabled: bool = False
    allow: Acl = field(default_factory=Acl)
    allow_networks: tuple[IPNetwork, ...] = ()
    deny_networks: tuple[IPNetwork, ...] = ()
    allow_ports: tuple[PortRange, ...] = ()

    def policy(self, own_addresses: Sequence[str | IPAddress] = ()) -> ExitPolicy:
        return ExitPolicy(self.allow_networks, self.deny_networks, self.allow_ports, own_addresses)


@dataclass(frozen=True)
class TunnelRoute:
    """One ``[[tunnel.route]]``: packets to ``prefix`` go to node ``via`` (a whole SID),
    and packets from ``via`` may carry source addresses in ``prefix``."""

    prefix: IPNetwork
    via: bytes


@dataclass(frozen=True)
class TunnelSection:
    """``[tunnel]``: the IP tunnel (TUN device ``name``, see meshpipe/tunnel.py)."""

    enabled: bool = False
    name: str = "mesh0"
    mtu: int = TUNNEL_DEFAULT_MTU
    # Extra addresses for the device besides the overlay /128 (e.g. an IPv4 /32 that
    # peers route back here): "198.18.201.1/32".
    addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...] = ()
    routes: tuple[TunnelRoute, ...] = ()
    # TUN offloads (meshpipe/offload.py): large TCP segments cross as one datagram.
    offload: bool = True


@dataclass(frozen=True)
class DiscoverySection:
    """``[discovery]``: how long this node's service records live and how often they
    are re-announced (seconds). Short values make a vanished node's services drop out
    of other nodes' lists sooner, at the price of more announcements."""

    lifetime: float = 120.0
    refresh: float = 40.0


RING_BYTES = 4 << 20  # default [limits] ring_bytes: the data area of one worker ring


@dataclass(frozen=True)
class LimitsSection:
    """``[limits]``: caps on what other nodes can make this node hold. Each one is
    per neighbour or per peer where that makes sense, so one bad link or one
    hostile peer cannot take the whole budget (docs/threat-model.md)."""

    # service discovery: records of other nodes' services
    max_service_records: int = DiscoveryLimits.max_records
    max_service_records_per_origin: int = DiscoveryLimits.max_per_origin
    max_service_records_per_neighbour: int = DiscoveryLimits.max_per_neighbour
    # MSP: streams peers opened that are still half-open (SYN received, no answer)
    max_syn_streams: int = MspParams.max_syn_streams
    max_syn_streams_per_peer: int = MspParams.max_syn_streams_per_peer
    # MSP: bytes of datagram fragments waiting for the rest of their message
    max_reassembly_bytes: int = MspParams.max_reassembly
    max_reassembly_bytes_per_peer: int = MspParams.max_reassembly_per_peer
    # routing: origins in the route table, of them brought in by one neighbour, and
    # neighbours per interface
    max_routes: int = CoreLimits.max_routes
    max_routes_per_neighbour: int = CoreLimits.max_routes_per_neighbour
    max_neighbours: int = CoreLimits.max_neighbours
    # memory of this node itself (smaller on a small router): the data area of each
    # shared-memory ring between two workers, and the bytes an MSP stream holds
    # unacknowledged (send) and unread (receive: the advertised window)
    ring_bytes: int = RING_BYTES
    stream_send_buffer: int = MspParams.send_buffer
    stream_recv_buffer: int = MspParams.recv_buffer

    def core_limits(self) -> CoreLimits:
        return CoreLimits(
            max_routes=self.max_routes,
            max_routes_per_neighbour=self.max_routes_per_neighbour,
            max_neighbours=self.max_neighbours,
        )

    def discovery_limits(self) -> DiscoveryLimits:
        return DiscoveryLimits(
            max_records=self.max_service_records,
            max_per_origin=self.max_service_records_per_origin,
            max_per_neighbour=self.max_service_records_per_neighbour,
        )

    def msp_params(self, base: MspParams | None = None) -> MspParams:
        return replace(
            base or MspParams(),
            max_syn_streams=self.max_syn_streams,
            max_syn_streams_per_peer=self.max_syn_streams_per_peer,
            max_reassembly=self.max_reassembly_bytes,
            max_reassembly_per_peer=self.max_reassembly_bytes_per_peer,
            send_buffer=self.stream_send_buffer,
            recv_buffer=self.stream_recv_buffer,
        )


@dataclass(frozen=True)
class MetricsSection:
    """``[metrics]``: the Prometheus endpoint (workers/metrics.py); off without ``listen``."""

    listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class DnsSection:
    """``[dns]``: the node's DNS responder for the ``mesh`` zone (meshpipe/meshdns.py),
    a UDP ``listen`` address; off (None) by default."""

    listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class Config:
    path: str  # absolute path of the file this was loaded from
    node: NodeSection
    workers: WorkersSection
    timing: TimingSection
    interfaces: tuple[InterfaceConfig, ...]
    services: tuple[ServiceConfig, ...] = ()
    exit: ExitSection = ExitSection()
    discovery: DiscoverySection = DiscoverySection()
    tunnel: TunnelSection = TunnelSection()
    limits: LimitsSection = LimitsSection()
    metrics: MetricsSection = MetricsSection()
    dns: DnsSection = DnsSection()


# -- HOST:PORT ---------------------------------------------------------------------------


def parse_hostport(text: str) -> tuple[str, int]:
    """Parse ``A.B.C.D:PORT`` or ``[IPV6]:PORT`` (numeric addresses only).

    Returns the host in canonical text form (``[::0001]:1`` gives ``("::1", 1)``) and the
    port (1..65535). Raises ValueError with a message fit to show a person.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected HOST:PORT text, got {_type_name(text)}")
    t = text.strip()
    if not t:
        raise ValueError("empty address: expected HOST:PORT")
    if t.startswith("["):
        close = t.find("]")
        if close < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = t[1:close], t[close + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not a numeric IPv6 address") from None
    else:
        if ":" not in t:
            raise ValueError(f"{text!r}: missing port (expected HOST:PORT)")
        if t.count(":") > 1:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets: [IPV6]:PORT")
        host, port_text = t.split(":")
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"{text!r}: {host!r} is not a numeric IPv4 address (host names are not accepted)"
            ) from None
    if not _PORT.fullmatch(port_text):
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range 1..65535")
    return str(ip), port


def format_hostport(addr: tuple[str, int]) -> str:
    """The inverse of :func:`parse_hostport`."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- validation helpers --------------------------------------------------------------------


class _Missing:
    pass


_MISSING: Final = _Missing()
T = TypeVar("T")


def _type_name(value: object) -> str:
    names: dict[type, str] = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        list: "an array",
        dict: "a table",
    }
    for typ, name in names.items():
        if type(value) is typ:
            return name
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class _Context:
    path: str  # as the user gave it, for messages
    base_dir: str  # absolute directory relative paths resolve against
    cpu_count: int
    timing: TimingSection = TimingSection()  # [timing], once parsed: interfaces inherit it
    per_interface: int = 1  # [workers] per_interface, once parsed


class _Table:
    """One TOML table being validated: typed getters that raise ConfigError."""

    def __init__(
        self, ctx: _Context, prefix: str, data: Mapping[str, Any], allowed: Sequence[str]
    ) -> None:
        self.ctx = ctx
        self.prefix = prefix
        self.data = data
        # Unknown keys first: a misspelt key would otherwise show up as "missing".
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                reason = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                reason += f"; known keys: {', '.join(allowed)}"
                raise ConfigError(ctx.path, self.key(key), reason)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.ctx.path, self.key(name), reason)

    def _get(self, name: str, default: object, want: str) -> object:
        if name in self.data:
            return self.data[name]
        if isinstance(default, _Missing):
            raise self.error(name, f"required key is missing (expected {want})")
        return default

    def _typed(self, name: str, default: T | _Missing, typ: type[T], want: str) -> T:
        value = self._get(name, default, want)
        # bool is an int subclass in Python; TOML keeps them apart, so do we.
        if type(value) is not typ:
            raise self.error(name, f"must be {want}, got {_type_name(value)}")
        assert isinstance(value, typ)
        return value

    def string(self, name: str, default: str | _Missing = _MISSING) -> str:
        return self._typed(name, default, str, "a string")

    def boolean(self, name: str, default: bool | _Missing = _MISSING) -> bool:
        return self._typed(name, default, bool, "true or false")

    def integer(
        self,
        name: str,
        default: int | _Missing = _MISSING,
        lo: int | None = None,
        hi: int | None = None,
    ) -> int:
        value = self._typed(name, default, int, "an integer")
        if lo is not None and value < lo:
            raise self.error(name, f"must be at least {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.error(name, f"must be at most {hi}, got {value}")
        return value

    def seconds(self, name: str, default: float) -> float:
        value = self._get(name, default, "a number of seconds")
        if type(value) not in (int, float):
            raise self.error(name, f"must be a number of seconds, got {_type_name(value)}")
        assert isinstance(value, int | float)
        seconds = float(value)
        if not math.isfinite(seconds) or seconds <= 0:
            raise self.error(name, f"must be a positive number of seconds, got {value}")
        return seconds

    def choice(self, name: str, options: Sequence[str], default: str | _Missing = _MISSING) -> str:
        value = self.string(name, default)
        if value not in options:
            raise self.error(name, f"must be one of {', '.join(options)}; got {value!r}")
        return value

    def count_or_auto(self, name: str, default: int | str) -> int:
        value = self._get(name, default, 'an integer >= 1 or "auto"')
        if value == "auto" and type(value) is str:
            return self.ctx.cpu_count
        if type(value) is not int:
            raise self.error(name, f'must be an integer >= 1 or "auto", got {value!r}')
        assert isinstance(value, int)
        if not 1 <= value <= MAX_WORKERS:
            raise self.error(name, f'must be between 1 and {MAX_WORKERS} (or "auto"), got {value}')
        return value

    def path(self, name: str, default: str | _Missing = _MISSING) -> str:
        value = self.string(name, default)
        if not value:
            raise self.error(name, "must not be empty")
        if "\0" in value:
            raise self.error(name, "must not contain a NUL character")
        return os.path.normpath(os.path.join(self.ctx.base_dir, value))

    def hostport(self, name: str, value: object | _Missing = _MISSING) -> tuple[str, int]:
        if isinstance(value, _Missing):
            value = self.string(name)
        elif type(value) is not str:
            raise self.error(name, f"must be a HOST:PORT string, got {_type_name(value)}")
        assert isinstance(value, str)
        try:
            return parse_hostport(value)
        except ValueError as exc:
            raise self.error(name, str(exc)) from None

    def string_list(self, name: str) -> list[str]:
        value = self._get(name, [], "an array of strings")
        if type(value) is not list:
            raise self.error(name, f"must be an array of strings, got {_type_name(value)}")
        assert isinstance(value, list)
        for i, item in enumerate(value):
            if type(item) is not str:
                raise self.error(f"{name}[{i}]", f"must be a string, got {_type_name(item)}")
        return value


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(host)


# -- one validator per section --------------------------------------------------------


def _section_node(t: _Table) -> NodeSection:
    key = t.path("key")
    sock = t.path("control_socket", DEFAULT_CONTROL_SOCKET)
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise t.error(
            "control_socket",
            f"resolves to {sock!r}, longer than the {MAX_SOCKET_PATH} bytes a Unix socket "
            "path may have; choose a shorter path",
        )
    name: str | None = None
    if "name" in t.data:
        name = t.string("name")
        if not name.strip():
            raise t.error("name", "must not be empty")
        if len(name) > MAX_NAME_LEN:
            raise t.error("name", f"must be at most {MAX_NAME_LEN} characters")
        if not name.isprintable():
            raise t.error("name", "must not contain control characters")
    level = t.choice("log_level", LOG_LEVELS, "info")
    return NodeSection(key=key, control_socket=sock, name=name, log_level=level)


def _section_workers(t: _Table) -> WorkersSection:
    return WorkersSection(
        per_interface=t.count_or_auto("per_interface", 1),
        crypto=t.count_or_auto("crypto", "auto"),
        udp_offload=t.boolean("udp_offload", True),
    )


def _section_timing(t: _Table, d: TimingSection = TimingSection()) -> TimingSection:
    hello = t.seconds("hello_interval", d.hello_interval)
    timeout = t.seconds("neighbour_timeout", d.neighbour_timeout)
    update = t.seconds("update_interval", d.update_interval)
    expiry = t.seconds("route_expiry", d.route_expiry)
    if timeout <= hello:
        raise t.error(
            "neighbour_timeout",
            f"must be greater than {t.key('hello_interval')} ({hello:g}), got {timeout:g}",
        )
    if expiry <= update:
        raise t.error(
            "route_expiry",
            f"must be greater than {t.key('update_interval')} ({update:g}), got {expiry:g}",
        )
    return TimingSection(hello, timeout, update, expiry)


_UDP_KEYS = ("listen", "peers", "discovery", "multicast_group")
_RADIO_KEYS = ("device", "baud", "rate_bps", "queue_bytes")
_INTERFACE_KEYS = (
    "name",
    "kind",
    *_UDP_KEYS,
    "mtu",
    "hop_recovery",
    *_RADIO_KEYS,
    *_TIMING_KEYS,
)


def _hop_recovery(t: _Table, kind: str, mtu: int) -> str:
    mode = t.choice("hop_recovery", HOP_RECOVERY_MODES, "auto")
    if kind == "radio" and mode == "auto":
        # Not by default on a radio: on a slow half-duplex channel the acks wait behind
        # the send queue, so timeouts fire early and the retransmissions fill the queue
        # (measured: a tunnel ping over 19,200 bit/s lost 5 of 5, a 200 KB stream took
        # twice as long). "on" stays available.
        return "off"
    if kind == "udp" and t.ctx.per_interface > 1:
        reason = "needs [workers] per_interface = 1 (a neighbour's acks reach one worker)"
    elif kind == "radio" and mtu - HOP_RECOVERY_OVERHEAD < RADIO_MIN_MTU:
        reason = f"needs mtu >= {RADIO_MIN_MTU + HOP_RECOVERY_OVERHEAD} on a radio"
    else:
        return mode
    if mode == "on":
        raise t.error("hop_recovery", f'"on" {reason}')
    return "off"


def _interface(t: _Table) -> InterfaceConfig:
    name = t.string("name")
    if not _IFACE_NAME.fullmatch(name):
        raise t.error("name", f"{name!r} must be 1 to 15 characters from a-z, 0-9, '_' and '-'")
    kind = t.choice("kind", INTERFACE_KINDS)
    foreign = _RADIO_KEYS if kind == "udp" else _UDP_KEYS
    for key in t.data:
        if key in foreign:
            other = "radio" if kind == "udp" else "udp"
            raise t.error(key, f"is a {other} key; this interface has kind = {kind!r}")
    timing: TimingSection | None = None
    if kind == "radio" or any(k in t.data for k in _TIMING_KEYS):
        timing = _section_timing(t, RADIO_TIMING if kind == "radio" else t.ctx.timing)
    if kind == "radio":
        return _radio_interface(t, name, timing)
    listen = t.hostport("listen")
    listen_ip = _ip(listen[0])
    if listen_ip.is_multicast:
        raise t.error("listen", f"{listen[0]} is a multicast address; give a local address")

    peers: list[tuple[str, int]] = []
    for i, text in enumerate(t.string_list("peers")):
        key = f"peers[{i}]"
        peer = t.hostport(key, text)
        ip = _ip(peer[0])
        if ip.is_unspecified or ip.is_multicast:
            raise t.error(key, f"{peer[0]} cannot be a peer address")
        if ip.version != listen_ip.version:
            raise t.error(
                key,
                f"an IPv{ip.version} peer cannot be reached from the IPv{listen_ip.version} "
                f"listen address {format_hostport(listen)}",
            )
        if peer in peers:
            raise t.error(key, f"{format_hostport(peer)} is listed twice")
        peers.append(peer)

    discovery = t.boolean("discovery", False)
    group = t.string("multicast_group", DEFAULT_MULTICAST_GROUP)
    try:
        group_ip = ipaddress.IPv4Address(group)
    except ValueError:
        raise t.error("multicast_group", f"{group!r} is not a numeric IPv4 address") from None
    if not group_ip.is_multicast:
        raise t.error("multicast_group", f"{group} is not a multicast address (224.0.0.0/4)")
    if discovery and listen_ip.version != 4:
        raise t.error("discovery", "LAN multicast discovery needs an IPv4 listen address")
    mtu = t.integer("mtu", DEFAULT_MTU, lo=MIN_MTU, hi=MAX_MTU)
    return InterfaceConfig(
        name=name,
        kind=kind,
        listen=listen,
        peers=tuple(peers),
        discovery=discovery,
        multicast_group=str(group_ip),
        mtu=mtu,
        timing=timing,
        hop_recovery=_hop_recovery(t, kind, mtu),
    )


def _radio_interface(t: _Table, name: str, timing: TimingSection | None) -> InterfaceConfig:
    device = t.path("device")
    baud = t.integer("baud")
    if baud not in RADIO_BAUDS:
        rates = ", ".join(map(str, RADIO_BAUDS))
        raise t.error("baud", f"{baud} is not a serial rate; use one of {rates}")
    mtu = t.integer("mtu", RADIO_DEFAULT_MTU, lo=RADIO_MIN_MTU, hi=RADIO_MAX_MTU)
    rate = t.integer("rate_bps", baud, lo=300, hi=10_000_000)
    # Enough for two worst-case (fully escaped) frames, or the queue could not work.
    queue_default = max(4 * mtu + 8, int(rate / 10 * RADIO_QUEUE_SECONDS))
    queue = t.integer("queue_bytes", queue_default, lo=4 * mtu + 8, hi=16 << 20)
    return InterfaceConfig(
        name,
        "radio",
        mtu=mtu,
        device=device,
        baud=baud,
        rate_bps=rate,
        queue_bytes=queue,
        timing=timing,
        hop_recovery=_hop_recovery(t, "radio", mtu),
    )


def _overlaps(a: tuple[str, int], b: tuple[str, int]) -> bool:
    ia, ib = _ip(a[0]), _ip(b[0])
    return (
        a[1] == b[1]
        and ia.version == ib.version
        and (ia == ib or ia.is_unspecified or ib.is_unspecified)
    )


def _section_interfaces(ctx: _Context, value: object) -> tuple[InterfaceConfig, ...]:
    if type(value) is not list:
        raise ConfigError(
            ctx.path, "interface", "must be an array of tables: write each one as [[interface]]"
        )
    assert isinstance(value, list)
    if not value:
        raise ConfigError(ctx.path, "interface", "at least one [[interface]] is required")
    result: list[InterfaceConfig] = []
    for i, item in enumerate(value):
        prefix = f"interface[{i}]"
        if type(item) is not dict:
            raise ConfigError(ctx.path, prefix, f"must be a table, got {_type_name(item)}")
        iface = _interface(_Table(ctx, prefix, item, _INTERFACE_KEYS))
        for j, other in enumerate(result):
            if other.name == iface.name:
                raise ConfigError(
                    ctx.path,
                    f"{prefix}.name",
                    f"duplicate interface name {iface.name!r} (also interface[{j}])",
                )
            if iface.kind == "radio" and other.kind == "radio" and other.device == iface.device:
                raise ConfigError(
                    ctx.path,
                    f"{prefix}.device",
                    f"{iface.device} is already used by interface[{j}]",
                )
            if "udp" == iface.kind == other.kind and _overlaps(other.listen, iface.listen):
                raise ConfigError(
                    ctx.path,
                    f"{prefix}.listen",
                    f"{format_hostport(iface.listen)} clashes with interface[{j}] "
                    f"({format_hostport(other.listen)})",
                )
        result.append(iface)
    return tuple(result)


def _acl(t: _Table, name: str) -> Acl:
    """``allow``: "any" or an array of whole SIDs; absent means closed."""
    if name not in t.data:
        return Acl()
    value = t.data[name]
    if type(value) is str:
        if value != "any":
            raise t.error(name, f'must be "any" or an array of SIDs, got {value!r}')
        return Acl.any()
    if type(value) is not list:
        raise t.error(name, f'must be "any" or an array of SIDs, got {_type_name(value)}')
    assert isinstance(value, list)
    for i, item in enumerate(value):
        try:
            Acl.parse([item])
        except AclError as exc:
            raise t.error(f"{name}[{i}]", str(exc)) from None
    return Acl.parse(value)


def _networks(t: _Table, name: str) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for i, text in enumerate(t.string_list(name)):
        try:
            out.append(parse_network(text))
        except ExitPolicyError as exc:
            raise t.error(f"{name}[{i}]", str(exc)) from None
    return tuple(out)


def _section_exit(t: _Table) -> ExitSection:
    value = t._get("allow_ports", [], "an array of ports or 'LO-HI' ranges")
    if type(value) is not list:
        raise t.error("allow_ports", f"must be an array of ports, got {_type_name(value)}")
    assert isinstance(value, list)
    ports: list[PortRange] = []
    for i, item in enumerate(value):
        if type(item) not in (int, str):
            raise t.error(f"allow_ports[{i}]", f"must be a port or 'LO-HI', got {_type_name(item)}")
        try:
            ports.append(PortRange.parse(item))
        except ExitPolicyError as exc:
            raise t.error(f"allow_ports[{i}]", str(exc)) from None
    return ExitSection(
        enabled=t.boolean("enabled", False),
        allow=_acl(t, "allow"),
        allow_networks=_networks(t, "allow_networks"),
        deny_networks=_networks(t, "deny_networks"),
        allow_ports=tuple(ports),
    )


_SERVICE_KEYS = ("name", "to", "port", "allow", "hidden", "kind", "protocol")


def _auto_port(name: str, taken: set[int]) -> int:
    r = AUTO_SERVICE_PORTS
    digest = hashlib.blake2b(name.encode(), digest_size=4, person=b"meshpipe-svc").digest()
    start = int.from_bytes(digest, "big") % len(r)
    for k in range(len(r)):
        port = r.start + (start + k) % len(r)
        if port not in taken:
            return port
    raise ValueError("no MSP port left")  # 48128 services: cannot happen in practice


def _section_services(ctx: _Context, value: object) -> tuple[ServiceConfig, ...]:
    if value == {}:
        return ()  # absent
    if type(value) is not list:
        raise ConfigError(
            ctx.path, "service", "must be an array of tables: write each one as [[service]]"
        )
    assert isinstance(value, list)
    tables: list[tuple[_Table, str, int | None]] = []
    explicit: dict[int, int] = {}
    names: dict[str, int] = {}
    for i, item in enumerate(value):
        prefix = f"service[{i}]"
        if type(item) is not dict:
            raise ConfigError(ctx.path, prefix, f"must be a table, got {_type_name(item)}")
        t = _Table(ctx, prefix, item, _SERVICE_KEYS)
        name = t.string("name")
        try:
            check_name(name)
        except ServiceError as exc:
            raise t.error("name", str(exc)) from None
        if name in names:
            raise t.error("name", f"duplicate service name {name!r} (also service[{names[name]}])")
        names[name] = i
        port: int | None = None
        if "port" in t.data:
            port = t.integer("port", lo=1, hi=65535)
            if port in explicit:
                raise t.error("port", f"MSP port {port} is also used by service[{explicit[port]}]")
            explicit[port] = i
        tables.append((t, name, port))
    taken = set(explicit)
    result: list[ServiceConfig] = []
    for t, name, given in tables:
        port = given if given is not None else _auto_port(name, taken)
        taken.add(port)
        to = t.hostport("to")
        if _ip(to[0]).is_unspecified or _ip(to[0]).is_multicast:
            raise t.error("to", f"{to[0]} cannot be a service target")
        result.append(
            ServiceConfig(
                name=name,
                to=to,
                port=port,
                allow=_acl(t, "allow"),
                hidden=t.boolean("hidden", False),
                kind=_service_kind(t),
            )
        )
    return tuple(result)


def _service_kind(t: _Table) -> str:
    """``protocol = "udp"`` (or ``kind``, its older name): what the service carries."""
    proto = t.choice("protocol", SERVICE_KINDS, "tcp")
    kind = t.choice("kind", SERVICE_KINDS, proto)
    if "protocol" in t.data and kind != proto:
        raise t.error("kind", f"says {kind!r} but protocol says {proto!r}")
    return kind


_TUNNEL_ROUTE_KEYS = ("prefix", "via")


def _section_tunnel(t: _Table) -> TunnelSection:
    name = t.string("name", "mesh0")
    if not _IFACE_NAME.fullmatch(name):
        raise t.error("name", f"{name!r} must be 1 to 15 characters from a-z, 0-9, '_' and '-'")
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    for i, text in enumerate(t.string_list("addresses")):
        try:
            addr = ipaddress.ip_interface(text)
        except ValueError:
            raise t.error(f"addresses[{i}]", f"{text!r} is not an ADDRESS/PREFIXLEN") from None
        if addr.ip in TUNNEL_OVERLAY:
            raise t.error(f"addresses[{i}]", "the overlay address is added by itself")
        addresses.append(addr)
    raw = t._get("route", [], "an array of tables [[tunnel.route]]")
    if type(raw) is not list:
        raise t.error("route", "must be an array of tables: write each one as [[tunnel.route]]")
    assert isinstance(raw, list)
    routes: list[TunnelRoute] = []
    for i, item in enumerate(raw):
        if type(item) is not dict:
            raise t.error(f"route[{i}]", f"must be a table, got {_type_name(item)}")
        r = _Table(t.ctx, t.key(f"route[{i}]"), item, _TUNNEL_ROUTE_KEYS)
        text = r.string("prefix")
        try:
            prefix = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise r.error("prefix", f"{text!r} is not a prefix: {exc}") from None
        via_text = r.string("via")
        if not re.fullmatch(r"[0-9a-f]{64}", via_text):
            raise r.error("via", "must be a whole SID: 64 lowercase hex characters")
        for j, other in enumerate(routes):
            if other.prefix == prefix:
                raise r.error("prefix", f"{prefix} is also routed by {t.key(f'route[{j}]')}")
        routes.append(TunnelRoute(prefix, bytes.fromhex(via_text)))
    return TunnelSection(
        enabled=t.boolean("enabled", False),
        name=name,
        mtu=t.integer("mtu", TUNNEL_DEFAULT_MTU, lo=TUNNEL_MIN_MTU, hi=MAX_MTU),
        addresses=tuple(addresses),
        routes=tuple(routes),
        offload=t.boolean("offload", True),
    )


def _section_discovery(t: _Table) -> DiscoverySection:
    lifetime = t.seconds("lifetime", DiscoverySection.lifetime)
    refresh = t.seconds("refresh", DiscoverySection.refresh)
    if not 0 < refresh < lifetime <= MAX_SERVICE_LIFETIME:
        raise t.error("refresh", f"want 0 < refresh < lifetime <= {MAX_SERVICE_LIFETIME:g} seconds")
    return DiscoverySection(lifetime=lifetime, refresh=refresh)


_LIMIT_KEYS = (
    "max_service_records",
    "max_service_records_per_origin",
    "max_service_records_per_neighbour",
    "max_syn_streams",
    "max_syn_streams_per_peer",
    "max_reassembly_bytes",
    "max_reassembly_bytes_per_peer",
    "max_routes",
    "max_routes_per_neighbour",
    "max_neighbours",
    "ring_bytes",
    "stream_send_buffer",
    "stream_recv_buffer",
)
# Lower bounds where 1 would not work: a ring must hold a batch of full-size frames,
# a stream window a few segments.
_LIMIT_FLOOR = {
    "ring_bytes": 64 << 10,
    "stream_send_buffer": 16 << 10,
    "stream_recv_buffer": 16 << 10,
}


def _section_limits(t: _Table) -> LimitsSection:
    d = LimitsSection()
    v = {k: t.integer(k, getattr(d, k), lo=_LIMIT_FLOOR.get(k, 1), hi=1 << 32) for k in _LIMIT_KEYS}
    for part, whole in (
        ("max_service_records_per_origin", "max_service_records"),
        ("max_service_records_per_neighbour", "max_service_records"),
        ("max_syn_streams_per_peer", "max_syn_streams"),
        ("max_reassembly_bytes_per_peer", "max_reassembly_bytes"),
        ("max_routes_per_neighbour", "max_routes"),
    ):
        if v[part] > v[whole]:
            raise t.error(part, f"must not exceed {whole} ({v[whole]}), got {v[part]}")
    return LimitsSection(**v)


def _section_metrics(t: _Table) -> MetricsSection:
    if "listen" not in t.data:
        return MetricsSection()
    host, port = t.hostport("listen")
    if _ip(host).is_unspecified:
        # A wildcard would publish the node's figures on every interface, the mesh's
        # underlay included; name the address to serve on.
        raise t.error("listen", f"{host} listens everywhere; give one address (e.g. 127.0.0.1)")
    return MetricsSection(listen=(host, port))


def _section_dns(t: _Table) -> DnsSection:
    return DnsSection(listen=t.hostport("listen") if "listen" in t.data else None)


def _table_section(
    keys: Sequence[str], fn: Callable[[_Table], T]
) -> Callable[[_Context, str, object], T]:
    """Adapt a validator of one plain ``[section]`` table."""

    def parse(ctx: _Context, name: str, value: object) -> T:
        if type(value) is not dict:
            raise ConfigError(ctx.path, name, f"must be a table [{name}], got {_type_name(value)}")
        assert isinstance(value, dict)
        return fn(_Table(ctx, name, value, keys))

    return parse


@dataclass(frozen=True)
class _Section:
    parse: Callable[[_Context, str, object], object]
    required: bool  # when absent and not required, parse sees an empty table


_SECTIONS: Final[dict[str, _Section]] = {
    "node": _Section(
        _table_section(("key", "control_socket", "name", "log_level"), _section_node), True
    ),
    "workers": _Section(
        _table_section(("per_interface", "crypto", "udp_offload"), _section_workers), False
    ),
    "timing": _Section(
        _table_section(
            ("hello_interval", "neighbour_timeout", "update_interval", "route_expiry"),
            _section_timing,
        ),
        False,
    ),
    "interface": _Section(lambda ctx, _name, value: _section_interfaces(ctx, value), True),
    "service": _Section(lambda ctx, _name, value: _section_services(ctx, value), False),
    "exit": _Section(
        _table_section(
            ("enabled", "allow", "allow_networks", "deny_networks", "allow_ports"), _section_exit
        ),
        False,
    ),
    "discovery": _Section(_table_section(("lifetime", "refresh"), _section_discovery), False),
    "tunnel": _Section(
        _table_section(
            ("enabled", "name", "mtu", "addresses", "route", "offload"), _section_tunnel
        ),
        False,
    ),
    "limits": _Section(_table_section(_LIMIT_KEYS, _section_limits), False),
    "metrics": _Section(_table_section(("listen",), _section_metrics), False),
    "dns": _Section(_table_section(("listen",), _section_dns), False),
}


# -- loading -------------------------------------------------------------------------------


def parse_config(text: str, path: str, cpu_count: int | None = None) -> Config:
    """Validate TOML ``text`` as if read from ``path`` (relative paths resolve beside it)."""
    if cpu_count is None:
        cpu_count = os.cpu_count() or 1
    if cpu_count < 1:
        raise ValueError("cpu_count must be at least 1")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"TOML syntax error: {exc}") from None
    ctx = _Context(path=path, base_dir=os.path.dirname(os.path.abspath(path)), cpu_count=cpu_count)
    for name, value in data.items():
        if name not in _SECTIONS:
            hint = difflib.get_close_matches(name, list(_SECTIONS), n=1)
            what = "unknown section" if type(value) is dict else "unknown key"
            if hint:
                what += f" (did you mean {hint[0]!r}?)"
            raise ConfigError(path, name, f"{what}; known sections: {', '.join(_SECTIONS)}")
    parsed: dict[str, Any] = {}
    for name, section in _SECTIONS.items():
        if name in data:
            parsed[name] = section.parse(ctx, name, data[name])
        elif section.required:
            form = "[[interface]]" if name == "interface" else f"[{name}]"
            raise ConfigError(path, name, f"required section {form} is missing")
        else:
            parsed[name] = section.parse(ctx, name, {})
        if name == "timing":
            ctx = replace(ctx, timing=parsed[name])  # per-interface timers inherit these
        if name == "workers":
            ctx = replace(ctx, per_interface=parsed[name].per_interface)
    return Config(
        path=os.path.abspath(path),
        node=parsed["node"],
        workers=parsed["workers"],
        timing=parsed["timing"],
        interfaces=parsed["interface"],
        services=parsed["service"],
        exit=parsed["exit"],
        discovery=parsed["discovery"],
        tunnel=parsed["tunnel"],
        limits=parsed["limits"],
        metrics=parsed["metrics"],
        dns=parsed["dns"],
    )


def load_config(path: str, cpu_count: int | None = None) -> Config:
    """Read and validate the config file at ``path``.

    ``cpu_count`` is what ``"auto"`` worker counts become (default: ``os.cpu_count()``).
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text (byte {exc.start})") from None
    return parse_config(text, path, cpu_count)


# -- the starter config (meshpipe init) -------------------------------------------------


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def starter_config_text(
    listen: str = DEFAULT_LISTEN,
    peers: Sequence[str] = (),
    name: str | None = None,
    discovery: bool = False,
    tunnel: bool = False,
) -> str:
    """The commented config that ``meshpipe init`` writes (key and socket beside it)."""
    listen_text = format_hostport(parse_hostport(listen))
    peer_texts = [format_hostport(parse_hostport(p)) for p in peers]
    d = TimingSection()
    name_line = f"name = {_toml_str(name)}" if name is not None else '# name = "gateway-1"'
    peers_line = "peers = [" + ", ".join(_toml_str(p) for p in peer_texts) + "]"
    return f"""\
# meshpipe node configuration (TOML), written by `meshpipe init`.
# Relative paths are resolved against the directory this file is in.
# Unknown sections or keys are errors, so a typo never passes silently.

[node]
# The node's secret key (made by `meshpipe init` or `meshpipe keygen`). Its public
# half is this node's address (SID). The file must be mode 0600.
key = "{KEY_FILE}"
# Unix socket where `meshpipe status`, `peers`, `routes` and `id` talk to the node.
# The default is {DEFAULT_CONTROL_SOCKET}; this one lives beside this file.
control_socket = "control.sock"
# A human label shown by `meshpipe status`; optional.
{name_line}
# How much to log: debug, info, warning or error.
log_level = "info"

[workers]
# Interface worker processes per interface, sharing its UDP port (SO_REUSEPORT):
# an integer >= 1, or "auto" for one per CPU core.
per_interface = 1
# Crypto worker processes (sessions, encryption, decryption): an integer >= 1 or
# "auto" for one per CPU core. Each owns the sessions of a share of the peers.
crypto = "auto"
# Send runs of frames to one peer with one system call and receive them the same
# way (UDP GSO/GRO, Linux >= 5.0); off only to compare.
udp_offload = true

[timing]
# Protocol timers in seconds; the defaults suit most links.
# How often to say hello to neighbours.
hello_interval = {d.hello_interval}
# A neighbour not heard from for this long is down (must exceed hello_interval).
neighbour_timeout = {d.neighbour_timeout}
# How often to send routing updates.
update_interval = {d.update_interval}
# A route not refreshed for this long is dropped (must exceed update_interval).
route_expiry = {d.route_expiry}

# One [[interface]] table per link; at least one is required.
[[interface]]
# A short unique name: 1 to 15 characters from a-z, 0-9, '_' and '-'.
name = "udp0"
# The link type; "udp" is the only one so far.
kind = "udp"
# Local UDP address to bind: A.B.C.D:PORT or [IPV6]:PORT (numeric addresses only).
listen = {_toml_str(listen_text)}
# Static peers to say hello to, as HOST:PORT, e.g. ["198.18.0.2:7700"].
{peers_line}
# Find neighbours on this LAN by multicast (IPv4 listen address needed).
discovery = {"true" if discovery else "false"}
# Multicast group for discovery; the port is the listen port.
multicast_group = "{DEFAULT_MULTICAST_GROUP}"
# Largest frame to send on this link, in bytes ({MIN_MTU}..{MAX_MTU}).
mtu = {DEFAULT_MTU}
# Per-hop recovery of lost DATA frames: "auto" retransmits on this link while the
# loss it measures pays for it, "on" always, "off" never (and frees the
# {HOP_RECOVERY_OVERHEAD} bytes of MTU its header takes).
hop_recovery = "auto"
{_starter_tunnel(tunnel)}"""


def _starter_tunnel(enabled: bool) -> str:
    return f"""
[tunnel]
# The IP tunnel: a TUN device with this node's overlay IPv6 address; other nodes'
# overlay addresses (fd00::/8) are reached through it, end-to-end encrypted.
enabled = {"true" if enabled else "false"}
# Name of the TUN device.
name = "mesh0"
# MTU of the TUN device ({TUNNEL_MIN_MTU}..{MAX_MTU}); packets are fragmented to each path's MTU.
mtu = {TUNNEL_DEFAULT_MTU}
# Let the kernel hand over large TCP segments (up to 64 kB, GSO/TSO) and take them
# back: far fewer packets to encrypt and send per byte.
offload = true
# Extra addresses for the device, e.g. an IPv4 address that peers route back here.
# addresses = ["198.18.201.1/32"]
# Route a prefix to a node (cryptokey routing, like WireGuard's allowed-ips): packets
# to it go to that node, and packets from that node may use source addresses in it.
# [[tunnel.route]]
# prefix = "198.18.200.0/24"
# via = "<the gateway's whole SID, 64 hex characters>"

# A DNS responder for the mesh zone: NAME.mesh, SIDPREFIX.mesh, NAME.SIDPREFIX.mesh
# (AAAA: overlay addresses) and PTR; off unless listen is set.
# [dns]
# listen = "127.0.0.1:5353"
"""


def write_starter_config(
    directory: str,
    listen: str = DEFAULT_LISTEN,
    peers: Sequence[str] = (),
    name: str | None = None,
    discovery: bool = False,
    tunnel: bool = False,
) -> tuple[str, Identity]:
    """Make ``directory`` (0700) with a new ``node.key`` and a commented ``meshpipe.toml``.

    Refuses to overwrite an existing config (ConfigError) or key (KeyFileError); nothing is
    written when the arguments would not make a valid config. Returns the config path and
    the new identity.
    """
    config_path = os.path.join(directory, CONFIG_FILE)
    key_path = os.path.join(directory, KEY_FILE)
    for key, addr in [("interface[0].listen", listen)] + [
        (f"interface[0].peers[{i}]", p) for i, p in enumerate(peers)
    ]:
        try:
            parse_hostport(addr)
        except ValueError as exc:
            raise ConfigError(config_path, key, str(exc)) from None
    text = starter_config_text(listen, peers, name, discovery, tunnel)
    parse_config(text, config_path, cpu_count=1)  # the file we write must load
    if os.path.lexists(config_path):
        raise ConfigError(config_path, "", "already exists; refusing to overwrite it")
    if os.path.lexists(key_path):
        raise KeyFileError(f"{key_path}: already exists; refusing to overwrite a key")

    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o700)
            os.chmod(directory, 0o700)  # makedirs' mode is narrowed by the umask only
        except OSError as exc:
            raise ConfigError(
                config_path, "", f"cannot create directory {directory}: {exc.strerror or exc}"
            ) from None

    ident = Identity.generate()
    ident.write(key_path)
    try:
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except BaseException as exc:
        os.unlink(key_path)  # no key without the config that names it
        if isinstance(exc, FileExistsError):
            raise ConfigError(config_path, "", "already exists; refusing to overwrite it") from None
        if isinstance(exc, OSError):
            raise ConfigError(config_path, "", f"cannot write: {exc.strerror or exc}") from None
        raise
    return config_path, ident
