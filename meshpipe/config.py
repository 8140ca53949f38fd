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
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from meshpipe.errors import ConfigError, KeyFileError
from meshpipe.identity import Identity

DEFAULT_CONTROL_SOCKET: Final = "/run/meshpipe/control.sock"
DEFAULT_LISTEN: Final = "127.0.0.1:7700"
DEFAULT_MULTICAST_GROUP: Final = "239.255.77.77"
DEFAULT_MTU: Final = 1400
MIN_MTU: Final = 576
MAX_MTU: Final = 65000
MAX_WORKERS: Final = 1024
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
INTERFACE_KINDS: Final = ("udp",)
CONFIG_FILE: Final = "meshpipe.toml"
KEY_FILE: Final = "node.key"
# sun_path holds 108 bytes on Linux; keep one for the terminating NUL.
MAX_SOCKET_PATH: Final = 107
MAX_NAME_LEN: Final = 64

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


@dataclass(frozen=True)
class TimingSection:
    """Protocol timers in seconds."""

    hello_interval: float = 1.0
    neighbour_timeout: float = 4.0
    update_interval: float = 4.0
    route_expiry: float = 14.0


@dataclass(frozen=True)
class InterfaceConfig:
    name: str
    kind: str
    listen: tuple[str, int]
    peers: tuple[tuple[str, int], ...] = ()
    discovery: bool = False
    multicast_group: str = DEFAULT_MULTICAST_GROUP
    mtu: int = DEFAULT_MTU


@dataclass(frozen=True)
class Config:
    path: str  # absolute path of the file this was loaded from
    node: NodeSection
    workers: WorkersSection
    timing: TimingSection
    interfaces: tuple[InterfaceConfig, ...]


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
        self, name: str, default: int | _Missing = _MISSING, lo: int | None = None,
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
            raise self.error(
                name, f'must be between 1 and {MAX_WORKERS} (or "auto"), got {value}'
            )
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
    )


def _section_timing(t: _Table) -> TimingSection:
    d = TimingSection()
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


_INTERFACE_KEYS = ("name", "kind", "listen", "peers", "discovery", "multicast_group", "mtu")


def _interface(t: _Table) -> InterfaceConfig:
    name = t.string("name")
    if not _IFACE_NAME.fullmatch(name):
        raise t.error("name", f"{name!r} must be 1 to 15 characters from a-z, 0-9, '_' and '-'")
    kind = t.choice("kind", INTERFACE_KINDS)
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
                key, f"an IPv{ip.version} peer cannot be reached from the IPv{listen_ip.version} "
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
        name=name, kind=kind, listen=listen, peers=tuple(peers), discovery=discovery,
        multicast_group=str(group_ip), mtu=mtu,
    )


def _overlaps(a: tuple[str, int], b: tuple[str, int]) -> bool:
    ia, ib = _ip(a[0]), _ip(b[0])
    return (
        a[1] == b[1] and ia.version == ib.version
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
                    ctx.path, f"{prefix}.name",
                    f"duplicate interface name {iface.name!r} (also interface[{j}])",
                )
            if _overlaps(other.listen, iface.listen):
                raise ConfigError(
                    ctx.path, f"{prefix}.listen",
                    f"{format_hostport(iface.listen)} clashes with interface[{j}] "
                    f"({format_hostport(other.listen)})",
                )
        result.append(iface)
    return tuple(result)


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
    "workers": _Section(_table_section(("per_interface", "crypto"), _section_workers), False),
    "timing": _Section(
        _table_section(
            ("hello_interval", "neighbour_timeout", "update_interval", "route_expiry"),
            _section_timing,
        ),
        False,
    ),
    "interface": _Section(lambda ctx, _name, value: _section_interfaces(ctx, value), True),
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
    return Config(
        path=os.path.abspath(path),
        node=parsed["node"],
        workers=parsed["workers"],
        timing=parsed["timing"],
        interfaces=parsed["interface"],
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
# Crypto worker processes (encryption and decryption): an integer >= 1 or "auto".
crypto = "auto"

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
"""


def write_starter_config(
    directory: str,
    listen: str = DEFAULT_LISTEN,
    peers: Sequence[str] = (),
    name: str | None = None,
    discovery: bool = False,
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
    text = starter_config_text(listen, peers, name, discovery)
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
