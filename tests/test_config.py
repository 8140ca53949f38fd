"""meshpipe.config: strict loading, defaults, paths, the starter config."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshpipe.config import (
    DEFAULT_CONTROL_SOCKET,
    RADIO_TIMING,
    Config,
    InterfaceConfig,
    LimitsSection,
    TimingSection,
    format_hostport,
    load_config,
    parse_hostport,
    write_starter_config,
)
from meshpipe.errors import ConfigError, KeyFileError
from meshpipe.identity import Identity
from meshpipe.services.discovery import DiscoveryLimits

MINIMAL = """\
[node]
key = "node.key"

[[interface]]
name = "udp0"
kind = "udp"
listen = "198.18.0.1:7700"
"""

FULL = """\
[node]
key = "keys/node.key"
control_socket = "run/control.sock"
name = "a"
log_level = "debug"

[workers]
per_interface = 2
crypto = 3

[timing]
hello_interval = 0.5
neighbour_timeout = 2.5
update_interval = 2
route_expiry = 7.0

[[interface]]
name = "udp0"
kind = "udp"
listen = "198.18.0.1:7700"
peers = ["198.18.0.2:7700", "198.18.0.3:7701"]
discovery = true
multicast_group = "239.255.77.78"
mtu = 1280

[[interface]]
name = "v6-link_1"
kind = "udp"
listen = "[::1]:7702"
peers = ["[::1]:7703"]
"""


def write(tmp_path: Path, text: str, name: str = "meshpipe.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_error(tmp_path: Path, text: str) -> tuple[str, ConfigError]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, cpu_count=4)
    return path, info.value


def assert_error(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path, err = load_error(tmp_path, text)
    msg = str(err)
    assert err.path == path
    assert err.key == key, msg
    assert reason in err.reason, msg
    assert path in msg and key in msg and reason in msg
    assert msg == f"{path}: {key}: {err.reason}"


# -- good configs ---------------------------------------------------------------------------


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), cpu_count=6)
    assert isinstance(cfg, Config)
    assert cfg.path == str(tmp_path / "meshpipe.toml")
    assert cfg.node.key == str(tmp_path / "node.key")
    assert cfg.node.control_socket == DEFAULT_CONTROL_SOCKET
    assert cfg.node.name is None
    assert cfg.node.log_level == "info"
    assert cfg.workers.per_interface == 1
    assert cfg.workers.crypto == 6  # "auto" by default
    assert cfg.timing == TimingSection(1.0, 4.0, 4.0, 14.0)
    assert cfg.interfaces == (
        InterfaceConfig(
            name="udp0",
            kind="udp",
            listen=("198.18.0.1", 7700),
            peers=(),
            discovery=False,
            multicast_group="239.255.77.77",
            mtu=1400,
        ),
    )


def test_full_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL), cpu_count=4)
    assert cfg.node.key == str(tmp_path / "keys" / "node.key")
    assert cfg.node.control_socket == str(tmp_path / "run" / "control.sock")
    assert cfg.node.name == "a"
    assert cfg.node.log_level == "debug"
    assert (cfg.workers.per_interface, cfg.workers.crypto) == (2, 3)
    assert cfg.timing == TimingSection(0.5, 2.5, 2.0, 7.0)
    assert isinstance(cfg.timing.update_interval, float)
    a, b = cfg.interfaces
    assert a.listen == ("198.18.0.1", 7700)
    assert a.peers == (("198.18.0.2", 7700), ("198.18.0.3", 7701))
    assert a.discovery is True
    assert a.multicast_group == "239.255.77.78"
    assert a.mtu == 1280
    assert b.name == "v6-link_1"
    assert b.listen == ("::1", 7702)
    assert b.peers == (("::1", 7703),)


def test_dataclasses_are_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(AttributeError):
        cfg.node.key = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.interfaces[0].mtu = 9000  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "etc" / "meshpipe"
    sub.mkdir(parents=True)
    text = MINIMAL.replace(
        'key = "node.key"', 'key = "../keys/node.key"\ncontrol_socket = "c.sock"'
    )
    write(sub, text)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config("etc/meshpipe/meshpipe.toml")
    assert cfg.node.key == str(tmp_path / "etc" / "keys" / "node.key")
    assert cfg.node.control_socket == str(sub / "c.sock")
    assert cfg.path == str(sub / "meshpipe.toml")


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    text = MINIMAL.replace('"node.key"', '"/var/lib/meshpipe/node.key"')
    cfg = load_config(write(tmp_path, text))
    assert cfg.node.key == "/var/lib/meshpipe/node.key"


def test_auto_worker_counts(tmp_path: Path) -> None:
    text = MINIMAL + '\n[workers]\nper_interface = "auto"\ncrypto = "auto"\n'
    path = write(tmp_path, text)
    cfg = load_config(path, cpu_count=3)
    assert (cfg.workers.per_interface, cfg.workers.crypto) == (3, 3)
    cfg = load_config(path)
    assert cfg.workers.per_interface == (os.cpu_count() or 1)


def test_section_order_does_not_matter(tmp_path: Path) -> None:
    text = '[[interface]]\nname = "x"\nkind = "udp"\nlisten = "127.0.0.1:1"\n[node]\nkey = "k"\n'
    assert load_config(write(tmp_path, text)).interfaces[0].name == "x"


# -- unreadable files --------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: ")
    assert "No such file" in str(info.value)


def test_toml_syntax_error(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, '[node]\nkey = "node.key\n')
    assert err.path == path and path in str(err)
    assert "TOML syntax error" in str(err)
    assert "line 2" in str(err)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "meshpipe.toml"
    path.write_bytes(b'[node]\nkey = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(str(path))


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path))


# -- unknown sections and keys --------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[nodes]\nkey = 1\n", "nodes"),
        ("[tunnel]\nmtuu = 1280\n", "tunnel.mtuu"),
        ("top_level = 1\n", "top_level"),
        ("[node.sub]\nx = 1\n", "node.sub"),
        ("[workers]\nper_iface = 2\n", "workers.per_iface"),
        ("[timing]\nhello = 1.0\n", "timing.hello"),
    ],
)
def test_unknown_section_or_key(tmp_path: Path, extra: str, key: str) -> None:
    # Unknown top-level entries go before the [node] table so they stay top-level.
    text = extra + MINIMAL if extra.startswith("top_level") else MINIMAL + extra
    assert_error(tmp_path, text, key, "unknown")


def test_unknown_key_in_node(tmp_path: Path) -> None:
    text = MINIMAL.replace('key = "node.key"', 'key = "node.key"\nlog_levl = "info"')
    assert_error(tmp_path, text, "node.log_levl", "did you mean 'log_level'")


def test_unknown_key_in_interface(tmp_path: Path) -> None:
    text = MINIMAL + 'multicast = "239.255.77.77"\n'
    assert_error(tmp_path, text, "interface[0].multicast", "unknown key")


def test_unknown_key_beats_missing_key(tmp_path: Path) -> None:
    text = MINIMAL.replace("listen =", "listne =")
    assert_error(tmp_path, text, "interface[0].listne", "did you mean 'listen'")


# -- missing things -------------------------------------------------------------------------


def test_missing_interface(tmp_path: Path) -> None:
    assert_error(tmp_path, '[node]\nkey = "node.key"\n', "interface", "[[interface]] is missing")


def test_empty_interface_list(tmp_path: Path) -> None:
    assert_error(tmp_path, 'interface = []\n[node]\nkey = "k"\n', "interface", "at least one")


def test_interface_as_single_table(tmp_path: Path) -> None:
    text = MINIMAL.replace("[[interface]]", "[interface]")
    assert_error(tmp_path, text, "interface", "[[interface]]")


def test_missing_node_section(tmp_path: Path) -> None:
    text = MINIMAL.replace('[node]\nkey = "node.key"\n', "")
    assert_error(tmp_path, text, "node", "[node] is missing")


def test_missing_node_key(tmp_path: Path) -> None:
    text = MINIMAL.replace('key = "node.key"', 'name = "a"')
    assert_error(tmp_path, text, "node.key", "required key is missing")


@pytest.mark.parametrize("key", ["name", "kind", "listen"])
def test_missing_interface_keys(tmp_path: Path, key: str) -> None:
    lines = [ln for ln in MINIMAL.splitlines() if not ln.startswith(f"{key} =")]
    assert_error(tmp_path, "\n".join(lines) + "\n", f"interface[0].{key}", "missing")


# -- bad values -------------------------------------------------------------------------------


def node(extra: str) -> str:
    return MINIMAL.replace('key = "node.key"', f'key = "node.key"\n{extra}')


def iface(extra: str, drop: str | None = None) -> str:
    lines = [ln for ln in MINIMAL.splitlines() if drop is None or not ln.startswith(f"{drop} =")]
    return "\n".join(lines) + "\n" + extra + "\n"


BAD_VALUES: list[tuple[str, str, str, str]] = [
    # (id, text, key, reason fragment)
    ("key-not-string", MINIMAL.replace('"node.key"', "7"), "node.key", "must be a string"),
    ("key-empty", MINIMAL.replace('"node.key"', '""'), "node.key", "must not be empty"),
    ("socket-bool", node("control_socket = true"), "node.control_socket", "must be a string"),
    (
        "socket-too-long",
        node(f'control_socket = "/{"s" * 120}"'),
        "node.control_socket",
        "107 bytes",
    ),
    ("name-int", node("name = 5"), "node.name", "must be a string"),
    ("name-empty", node('name = " "'), "node.name", "must not be empty"),
    ("name-control-char", node('name = "a\\nb"'), "node.name", "control characters"),
    ("log-level", node('log_level = "verbose"'), "node.log_level", "debug, info, warning, error"),
    ("log-level-upper", node('log_level = "INFO"'), "node.log_level", "must be one of"),
    (
        "workers-zero",
        MINIMAL + "[workers]\nper_interface = 0\n",
        "workers.per_interface",
        "between 1 and",
    ),
    ("workers-negative", MINIMAL + "[workers]\ncrypto = -2\n", "workers.crypto", "between 1"),
    ("workers-huge", MINIMAL + "[workers]\ncrypto = 100000\n", "workers.crypto", "between 1"),
    (
        "workers-float",
        MINIMAL + "[workers]\nper_interface = 1.5\n",
        "workers.per_interface",
        '"auto"',
    ),
    (
        "workers-bool",
        MINIMAL + "[workers]\nper_interface = true\n",
        "workers.per_interface",
        '"auto"',
    ),
    ("workers-word", MINIMAL + '[workers]\ncrypto = "many"\n', "workers.crypto", '"auto"'),
    ("workers-not-table", "workers = 3\n" + MINIMAL, "workers", "must be a table"),
    (
        "hello-negative",
        MINIMAL + "[timing]\nhello_interval = -1.0\n",
        "timing.hello_interval",
        "positive",
    ),
    ("hello-zero", MINIMAL + "[timing]\nhello_interval = 0\n", "timing.hello_interval", "positive"),
    (
        "hello-inf",
        MINIMAL + "[timing]\nhello_interval = inf\n",
        "timing.hello_interval",
        "positive",
    ),
    (
        "hello-nan",
        MINIMAL + "[timing]\nhello_interval = nan\n",
        "timing.hello_interval",
        "positive",
    ),
    (
        "timing-string",
        MINIMAL + '[timing]\nroute_expiry = "14"\n',
        "timing.route_expiry",
        "number of seconds",
    ),
    (
        "timing-bool",
        MINIMAL + "[timing]\nupdate_interval = true\n",
        "timing.update_interval",
        "number of seconds",
    ),
    (
        "timeout-below-hello",
        MINIMAL + "[timing]\nhello_interval = 2.0\nneighbour_timeout = 1.5\n",
        "timing.neighbour_timeout",
        "greater than timing.hello_interval",
    ),
    (
        "timeout-equal-hello",
        MINIMAL + "[timing]\nhello_interval = 4.0\n",
        "timing.neighbour_timeout",
        "greater than timing.hello_interval (4)",
    ),
    (
        "expiry-below-update",
        MINIMAL + "[timing]\nroute_expiry = 3\n",
        "timing.route_expiry",
        "greater than timing.update_interval",
    ),
    (
        "expiry-vs-raised-update",
        MINIMAL + "[timing]\nupdate_interval = 20\n",
        "timing.route_expiry",
        "greater than timing.update_interval (20)",
    ),
    ("iface-name-upper", MINIMAL.replace('"udp0"', '"UDP0"'), "interface[0].name", "a-z"),
    (
        "iface-name-long",
        MINIMAL.replace('"udp0"', '"a' + "b" * 15 + '"'),
        "interface[0].name",
        "1 to 15",
    ),
    ("iface-name-empty", MINIMAL.replace('"udp0"', '""'), "interface[0].name", "1 to 15"),
    ("iface-name-space", MINIMAL.replace('"udp0"', '"udp 0"'), "interface[0].name", "a-z"),
    (
        "kind-unknown",
        MINIMAL.replace('kind = "udp"', 'kind = "serial"'),
        "interface[0].kind",
        "must be one of udp, radio",
    ),
    (
        "kind-int",
        MINIMAL.replace('kind = "udp"', "kind = 1"),
        "interface[0].kind",
        "must be a string",
    ),
    (
        "listen-no-port",
        iface('listen = "198.18.0.1"', "listen"),
        "interface[0].listen",
        "missing port",
    ),
    (
        "listen-port-zero",
        iface('listen = "198.18.0.1:0"', "listen"),
        "interface[0].listen",
        "out of range",
    ),
    (
        "listen-port-big",
        iface('listen = "198.18.0.1:65536"', "listen"),
        "interface[0].listen",
        "out of range",
    ),
    (
        "listen-port-word",
        iface('listen = "198.18.0.1:http"', "listen"),
        "interface[0].listen",
        "not a number",
    ),
    (
        "listen-port-negative",
        iface('listen = "198.18.0.1:-1"', "listen"),
        "interface[0].listen",
        "not a number",
    ),
    (
        "listen-hostname",
        iface('listen = "localhost:7700"', "listen"),
        "interface[0].listen",
        "not a numeric IPv4 address",
    ),
    (
        "listen-bad-ipv4",
        iface('listen = "198.18.0.256:7700"', "listen"),
        "interface[0].listen",
        "not a numeric IPv4 address",
    ),
    (
        "listen-ipv6-unbracketed",
        iface('listen = "::1:7700"', "listen"),
        "interface[0].listen",
        "brackets",
    ),
    (
        "listen-bad-ipv6",
        iface('listen = "[::g]:7700"', "listen"),
        "interface[0].listen",
        "not a numeric IPv6 address",
    ),
    (
        "listen-ipv6-no-close",
        iface('listen = "[::1:7700"', "listen"),
        "interface[0].listen",
        "missing ']'",
    ),
    (
        "listen-multicast",
        iface('listen = "239.255.77.77:7700"', "listen"),
        "interface[0].listen",
        "multicast",
    ),
    ("listen-int", iface("listen = 7700", "listen"), "interface[0].listen", "must be a string"),
    ("peers-string", iface('peers = "198.18.0.2:7700"'), "interface[0].peers", "array of strings"),
    (
        "peer-int",
        iface('peers = ["198.18.0.2:7700", 5]'),
        "interface[0].peers[1]",
        "must be a string",
    ),
    (
        "peer-bad-port",
        iface('peers = ["198.18.0.2:99999"]'),
        "interface[0].peers[0]",
        "out of range",
    ),
    (
        "peer-hostname",
        iface('peers = ["peer.example:7700"]'),
        "interface[0].peers[0]",
        "host names are not accepted",
    ),
    (
        "peer-unspecified",
        iface('peers = ["0.0.0.0:7700"]'),
        "interface[0].peers[0]",
        "cannot be a peer",
    ),
    (
        "peer-family",
        iface('peers = ["[::1]:7700"]'),
        "interface[0].peers[0]",
        "IPv6 peer cannot be reached",
    ),
    (
        "peer-duplicate",
        iface('peers = ["198.18.0.2:7700", "198.18.0.2:7700"]'),
        "interface[0].peers[1]",
        "listed twice",
    ),
    ("discovery-string", iface('discovery = "yes"'), "interface[0].discovery", "true or false"),
    (
        "discovery-ipv6",
        iface("discovery = true", "listen") + 'listen = "[::1]:7700"\n',
        "interface[0].discovery",
        "IPv4",
    ),
    (
        "group-unicast",
        iface('multicast_group = "198.18.0.9"'),
        "interface[0].multicast_group",
        "not a multicast address",
    ),
    (
        "group-garbage",
        iface('multicast_group = "lan"'),
        "interface[0].multicast_group",
        "not a numeric IPv4",
    ),
    ("mtu-small", iface("mtu = 575"), "interface[0].mtu", "at least 576"),
    ("mtu-big", iface("mtu = 65001"), "interface[0].mtu", "at most 65000"),
    ("mtu-negative", iface("mtu = -1400"), "interface[0].mtu", "at least 576"),
    ("mtu-float", iface("mtu = 1400.0"), "interface[0].mtu", "must be an integer"),
    ("mtu-string", iface('mtu = "1400"'), "interface[0].mtu", "must be an integer"),
    ("iface-not-table", 'interface = [1]\n[node]\nkey = "k"\n', "interface[0]", "must be a table"),
]


@pytest.mark.parametrize(
    ("text", "key", "reason"), [b[1:] for b in BAD_VALUES], ids=[b[0] for b in BAD_VALUES]
)
def test_bad_value(tmp_path: Path, text: str, key: str, reason: str) -> None:
    assert_error(tmp_path, text, key, reason)


SECOND = '[[interface]]\nname = "{name}"\nkind = "udp"\nlisten = "{listen}"\n'


@pytest.mark.parametrize(
    ("name", "listen", "key", "reason"),
    [
        (
            "udp0",
            "198.18.0.1:7701",
            "interface[1].name",
            "duplicate interface name 'udp0' (also interface[0])",
        ),
        ("udp1", "198.18.0.1:7700", "interface[1].listen", "clashes with interface[0]"),
        ("udp1", "0.0.0.0:7700", "interface[1].listen", "clashes with interface[0]"),
    ],
)
def test_interfaces_clash(tmp_path: Path, name: str, listen: str, key: str, reason: str) -> None:
    text = MINIMAL + SECOND.format(name=name, listen=listen)
    assert_error(tmp_path, text, key, reason)


def test_interfaces_on_other_ports_or_families_do_not_clash(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + SECOND.format(name="udp1", listen="198.18.0.1:7701")
        + SECOND.format(name="udp2", listen="[::]:7700")
    )
    assert [i.name for i in load_config(write(tmp_path, text)).interfaces] == [
        "udp0",
        "udp1",
        "udp2",
    ]


# -- parse_hostport ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.18.0.1:7700", ("198.18.0.1", 7700)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("[::1]:7700", ("::1", 7700)),
        ("[0:0:0:0:0:0:0:1]:7700", ("::1", 7700)),
        ("[FD00::AB]:7700", ("fd00::ab", 7700)),
        (" 198.18.0.1:7700 ", ("198.18.0.1", 7700)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected
    assert parse_hostport(format_hostport(expected)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "198.18.0.1",
        "198.18.0.1:",
        ":7700",
        "198.18.0.1:0",
        "198.18.0.1:65536",
        "198.18.0.1:+1",
        "198.18.0.1:٣",
        "host:7700",
        "::1:7700",
        "[::1]",
        "[::1]7700",
        "[198.18.0.1]:7700",
        "198.18.0.01:7700",
        "1.2.3:7700",
        "[::1]:7700:1",
    ],
)
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_hostport(text)


def test_format_hostport() -> None:
    assert format_hostport(("198.18.0.1", 7700)) == "198.18.0.1:7700"
    assert format_hostport(("::1", 7700)) == "[::1]:7700"


# -- the starter config ------------------------------------------------------------------------


def test_starter_config_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "node-a"
    path, ident = write_starter_config(
        str(d), "127.0.0.1:7711", ["127.0.0.1:7712", "127.0.0.1:7713"], "node a"
    )
    assert path == str(d / "meshpipe.toml")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    key = d / "node.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert Identity.load(str(key)).sid == ident.sid

    cfg = load_config(path, cpu_count=2)
    assert cfg.node.key == str(key)
    assert cfg.node.control_socket == str(d / "control.sock")
    assert cfg.node.name == "node a"
    assert cfg.workers.crypto == 2
    assert cfg.timing == TimingSection()
    (i,) = cfg.interfaces
    assert i.listen == ("127.0.0.1", 7711)
    assert i.peers == (("127.0.0.1", 7712), ("127.0.0.1", 7713))
    assert i.discovery is False

    text = Path(path).read_text()
    for section in ("[node]", "[workers]", "[timing]", "[[interface]]"):
        assert section in text
    assert 'control_socket = "control.sock"' in text
    # Every key has a comment on the line before it.
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assert lines[n - 1].startswith("#"), line


def test_starter_config_defaults_to_loopback(tmp_path: Path) -> None:
    path, _ = write_starter_config(str(tmp_path / "n"), peers=[], name=None)
    cfg = load_config(path)
    assert cfg.interfaces[0].listen == ("127.0.0.1", 7700)
    assert cfg.interfaces[0].peers == ()
    assert cfg.node.name is None


def test_starter_config_discovery_and_odd_name(tmp_path: Path) -> None:
    name = 'say "hi" \\ ünïcode'
    path, _ = write_starter_config(str(tmp_path / "n"), "198.18.0.1:7700", [], name, True)
    cfg = load_config(path)
    assert cfg.interfaces[0].discovery is True
    assert cfg.node.name == name


def test_starter_config_umask_zero(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path, _ = write_starter_config(str(tmp_path / "n"), "127.0.0.1:7700", [], None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "n").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "n" / "node.key").st_mode) == 0o600
    load_config(path)


def test_starter_config_existing_directory_is_fine(tmp_path: Path) -> None:
    path, _ = write_starter_config(str(tmp_path), "127.0.0.1:7700", [], None)
    assert load_config(path).node.key == str(tmp_path / "node.key")


def test_starter_config_refuses_to_overwrite_config(tmp_path: Path) -> None:
    path, _ = write_starter_config(str(tmp_path / "n"), "127.0.0.1:7700", [], "a")
    before = Path(path).read_text()
    key_before = (tmp_path / "n" / "node.key").read_text()
    with pytest.raises(ConfigError) as info:
        write_starter_config(str(tmp_path / "n"), "127.0.0.1:7701", [], "b")
    assert info.value.path == path
    assert "refusing to overwrite" in str(info.value)
    assert Path(path).read_text() == before
    assert (tmp_path / "n" / "node.key").read_text() == key_before


def test_starter_config_refuses_to_overwrite_key(tmp_path: Path) -> None:
    d = tmp_path / "n"
    d.mkdir()
    (d / "node.key").write_text("precious")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        write_starter_config(str(d), "127.0.0.1:7700", [], None)
    assert (d / "node.key").read_text() == "precious"
    assert not (d / "meshpipe.toml").exists()


@pytest.mark.parametrize(
    ("listen", "peers", "name", "discovery", "key"),
    [
        ("127.0.0.1", [], None, False, "interface[0].listen"),
        ("127.0.0.1:7700", ["127.0.0.1:7701", "nohost:1"], None, False, "interface[0].peers[1]"),
        ("127.0.0.1:7700", ["[::1]:7701"], None, False, "interface[0].peers[0]"),
        ("127.0.0.1:7700", [], "bad\nname", False, "node.name"),
        ("[::1]:7700", [], None, True, "interface[0].discovery"),
    ],
)
def test_starter_config_bad_arguments_write_nothing(
    tmp_path: Path, listen: str, peers: list[str], name: str | None, discovery: bool, key: str
) -> None:
    d = tmp_path / "n"
    with pytest.raises(ConfigError) as info:
        write_starter_config(str(d), listen, peers, name, discovery)
    assert info.value.key == key
    assert str(d / "meshpipe.toml") in str(info.value)
    assert not d.exists()


# -- radio interfaces --------------------------------------------------------------------------

RADIO = """\
[node]
key = "node.key"

[[interface]]
name = "radio0"
kind = "radio"
device = "/dev/ttyUSB0"
baud = 19200
"""


def test_radio_interface_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, RADIO))
    (r,) = cfg.interfaces
    assert (r.kind, r.device, r.baud, r.rate_bps, r.mtu) == (
        "radio",
        "/dev/ttyUSB0",
        19200,
        19200,
        255,
    )
    assert r.queue_bytes == 3840  # two seconds of air time at 19,200 bit/s
    assert r.timing == RADIO_TIMING
    assert r.listen == ("", 0) and r.peers == ()
    assert cfg.timing == TimingSection()  # the node-wide timers are untouched


def test_radio_interface_full(tmp_path: Path) -> None:
    text = RADIO.replace('device = "/dev/ttyUSB0"', 'device = "tty/radio"') + (
        "mtu = 200\nrate_bps = 9600\nqueue_bytes = 5000\nhello_interval = 20\n"
        "neighbour_timeout = 70\n"
    )
    text += MINIMAL.split("\n\n", 1)[1]  # and a UDP interface beside it
    cfg = load_config(write(tmp_path, text))
    r, u = cfg.interfaces
    assert r.device == str(tmp_path / "tty" / "radio")
    assert (r.mtu, r.rate_bps, r.queue_bytes) == (200, 9600, 5000)
    assert r.timing == TimingSection(
        20.0, 70.0, RADIO_TIMING.update_interval, RADIO_TIMING.route_expiry
    )
    assert u.kind == "udp" and u.timing is None


def test_udp_interface_timing_inherits_timing_section(tmp_path: Path) -> None:
    text = MINIMAL.replace("[[interface]]", "[timing]\nhello_interval = 0.5\n\n[[interface]]")
    cfg = load_config(write(tmp_path, text + "update_interval = 8\nroute_expiry = 30\n"))
    assert cfg.interfaces[0].timing == TimingSection(0.5, 4.0, 8.0, 30.0)


RADIO_BAD: list[tuple[str, str, str, str]] = [
    (
        "udp-key-on-radio",
        RADIO + 'listen = "198.18.0.1:7700"\n',
        "interface[0].listen",
        "is a udp key; this interface has kind = 'radio'",
    ),
    ("peers-on-radio", RADIO + "peers = []\n", "interface[0].peers", "is a udp key"),
    (
        "radio-key-on-udp",
        MINIMAL + "baud = 9600\n",
        "interface[0].baud",
        "is a radio key; this interface has kind = 'udp'",
    ),
    ("device-on-udp", MINIMAL + 'device = "/dev/ttyS0"\n', "interface[0].device", "is a radio key"),
    ("no-device", RADIO.replace('device = "/dev/ttyUSB0"\n', ""), "interface[0].device", "missing"),
    ("no-baud", RADIO.replace("baud = 19200\n", ""), "interface[0].baud", "missing"),
    ("odd-baud", RADIO.replace("19200", "19000"), "interface[0].baud", "not a serial rate"),
    ("baud-string", RADIO.replace("19200", '"19200"'), "interface[0].baud", "an integer"),
    ("mtu-small", RADIO + "mtu = 128\n", "interface[0].mtu", "at least 196"),
    ("mtu-big", RADIO + "mtu = 5000\n", "interface[0].mtu", "at most 4096"),
    ("rate-small", RADIO + "rate_bps = 10\n", "interface[0].rate_bps", "at least 300"),
    ("queue-small", RADIO + "queue_bytes = 100\n", "interface[0].queue_bytes", "at least"),
    (
        "radio-timeout",
        RADIO + "hello_interval = 150\n",
        "interface[0].neighbour_timeout",
        "greater than interface[0].hello_interval (150)",
    ),
    (
        "udp-timing-bad",
        MINIMAL + "update_interval = 20\n",
        "interface[0].route_expiry",
        "greater than interface[0].update_interval (20)",
    ),
    (
        "same-device",
        RADIO + RADIO.split("\n\n", 1)[1].replace("radio0", "radio1"),
        "interface[1].device",
        "already used by interface[0]",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "reason"), [r[1:] for r in RADIO_BAD], ids=[r[0] for r in RADIO_BAD]
)
def test_radio_bad_value(tmp_path: Path, text: str, key: str, reason: str) -> None:
    assert_error(tmp_path, text, key, reason)


# -- [[service]] and [exit] -------------------------------------------------------------------

SID_A = str(Identity.from_seed(b"a" * 32).sid)
SID_B = str(Identity.from_seed(b"b" * 32).sid)

SERVICES = (
    MINIMAL
    + f"""
[[service]]
name = "web"
to = "127.0.0.1:8080"
allow = ["{SID_A}", "{SID_B}"]

[[service]]
name = "ssh"
to = "[::1]:22"
port = 2222
allow = "any"
hidden = true
kind = "tcp"

[[service]]
name = "closed"
to = "198.18.0.9:9"

[exit]
enabled = true
allow = ["{SID_A}"]
allow_networks = ["198.18.0.0/15", "fd00::/8"]
deny_networks = ["198.18.7.0/24"]
allow_ports = [80, "443", "8000-8100"]
"""
)


def test_services_and_exit(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SERVICES), cpu_count=1)
    web, ssh, closed = cfg.services
    assert (web.name, web.to, web.hidden, web.kind) == ("web", ("127.0.0.1", 8080), False, "tcp")
    assert web.allow.allows(bytes.fromhex(SID_A)) and web.allow.allows(bytes.fromhex(SID_B))
    assert (ssh.to, ssh.port, ssh.hidden) == (("::1", 22), 2222, True)
    assert ssh.allow.open_to_all
    assert not closed.allow.allows(bytes.fromhex(SID_A))  # no allow list: closed
    assert len({web.port, ssh.port, closed.port}) == 3
    assert all(1024 <= s.port < 49152 for s in (web, closed))
    ex = cfg.exit
    assert ex.enabled and ex.allow.allows(bytes.fromhex(SID_A))
    assert not ex.allow.allows(bytes.fromhex(SID_B))
    assert [str(n) for n in ex.allow_networks] == ["198.18.0.0/15", "fd00::/8"]
    assert [str(p) for p in ex.allow_ports] == ["80", "443", "8000-8100"]
    policy = ex.policy(own_addresses=["198.18.0.1"])
    assert policy.check("198.18.0.9", 8050).allowed
    assert policy.check("198.18.7.1", 80).reason == "denied_network"
    assert policy.check("198.18.0.1", 80).reason == "own_address"


def test_no_services_no_exit_by_default(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), cpu_count=1)
    assert cfg.services == ()
    assert not cfg.exit.enabled and not cfg.exit.allow.open_to_all and not cfg.exit.allow.sids


def test_auto_port_is_deterministic_and_avoids_given_ports(tmp_path: Path) -> None:
    one = MINIMAL + '[[service]]\nname = "web"\nto = "127.0.0.1:80"\n'
    auto = load_config(write(tmp_path, one), cpu_count=1).services[0].port
    assert load_config(write(tmp_path, one, "b.toml"), cpu_count=1).services[0].port == auto
    both = one + f'[[service]]\nname = "other"\nto = "127.0.0.1:81"\nport = {auto}\n'
    web, other = load_config(write(tmp_path, both, "c.toml"), cpu_count=1).services
    assert other.port == auto and web.port != auto


def svc(extra: str, to: str = '"127.0.0.1:80"') -> str:
    return MINIMAL + f'[[service]]\nname = "web"\nto = {to}\n' + extra


SERVICE_BAD: list[tuple[str, str, str, str]] = [
    ("prefix", svc(f'allow = ["{SID_A[:16]}"]\n'), "service[0].allow[0]", "SID prefix"),
    ("not-sid", svc('allow = ["bob"]\n'), "service[0].allow[0]", "not a SID"),
    ("any-in-list", svc(f'allow = ["{SID_A}", "any"]\n'), "service[0].allow[1]", "any"),
    ("allow-word", svc('allow = "all"\n'), "service[0].allow", 'must be "any"'),
    ("allow-int", svc("allow = 1\n"), "service[0].allow", "got an integer"),
    ("no-to", MINIMAL + '[[service]]\nname = "web"\n', "service[0].to", "missing"),
    ("no-name", MINIMAL + '[[service]]\nto = "127.0.0.1:1"\n', "service[0].name", "missing"),
    ("bad-name", svc("").replace('"web"', '"Web Site"'), "service[0].name", "service name"),
    ("host-name", svc("", '"localhost:80"'), "service[0].to", "not a numeric"),
    ("to-any", svc("", '"0.0.0.0:80"'), "service[0].to", "cannot be a service target"),
    ("port-0", svc("port = 0\n"), "service[0].port", "at least 1"),
    ("kind", svc('kind = "sctp"\n'), "service[0].kind", "must be one of tcp, udp"),
    ("hidden-str", svc('hidden = "yes"\n'), "service[0].hidden", "true or false"),
    ("unknown-key", svc("allowed = []\n"), "service[0].allowed", "did you mean 'allow'"),
    (
        "dup-name",
        svc("") + '[[service]]\nname = "web"\nto = "127.0.0.1:81"\n',
        "service[1].name",
        "duplicate service name 'web'",
    ),
    (
        "dup-port",
        svc("port = 5000\n") + '[[service]]\nname = "b"\nto = "127.0.0.1:81"\nport = 5000\n',
        "service[1].port",
        "also used by service[0]",
    ),
    ("single-table", MINIMAL + '[service]\nname = "web"\n', "service", "[[service]]"),
    ("exit-prefix", MINIMAL + f'[exit]\nallow = ["{SID_A[:8]}"]\n', "exit.allow[0]", "prefix"),
    (
        "exit-net",
        MINIMAL + '[exit]\nallow_networks = ["198.18.0.1/15"]\n',
        "exit.allow_networks[0]",
        "host bits",
    ),
    (
        "exit-net-type",
        MINIMAL + "[exit]\ndeny_networks = [1]\n",
        "exit.deny_networks[0]",
        "must be a string",
    ),
    (
        "exit-ports",
        MINIMAL + '[exit]\nallow_ports = ["90-80"]\n',
        "exit.allow_ports[0]",
        "bad port range",
    ),
    (
        "exit-port-float",
        MINIMAL + "[exit]\nallow_ports = [1.5]\n",
        "exit.allow_ports[0]",
        "got a float",
    ),
    (
        "exit-ports-str",
        MINIMAL + '[exit]\nallow_ports = "80"\n',
        "exit.allow_ports",
        "must be an array",
    ),
    ("exit-enabled", MINIMAL + "[exit]\nenabled = 1\n", "exit.enabled", "true or false"),
    (
        "exit-unknown",
        MINIMAL + "[exit]\nallow_network = []\n",
        "exit.allow_network",
        "did you mean 'allow_networks'",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "reason"), [r[1:] for r in SERVICE_BAD], ids=[r[0] for r in SERVICE_BAD]
)
def test_service_and_exit_bad_value(tmp_path: Path, text: str, key: str, reason: str) -> None:
    assert_error(tmp_path, text, key, reason)


def test_limits_section(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), cpu_count=1)
    assert cfg.limits == LimitsSection()
    assert cfg.limits.discovery_limits() == DiscoveryLimits()
    text = MINIMAL + (
        "\n[limits]\nmax_service_records = 512\nmax_service_records_per_neighbour = 128\n"
        "max_syn_streams = 100\nmax_syn_streams_per_peer = 10\n"
        "max_reassembly_bytes_per_peer = 65536\n"
    )
    cfg = load_config(write(tmp_path, text), cpu_count=1)
    lim = cfg.limits.discovery_limits()
    assert (lim.max_records, lim.max_per_neighbour, lim.max_per_origin) == (512, 128, 64)
    msp = cfg.limits.msp_params()
    assert (msp.max_syn_streams, msp.max_syn_streams_per_peer) == (100, 10)
    assert msp.max_reassembly_per_peer == 65536
    assert msp.max_reassembly == LimitsSection.max_reassembly_bytes
    assert_error(
        tmp_path,
        MINIMAL + "\n[limits]\nmax_syn_streams = 8\n",
        "limits.max_syn_streams_per_peer",
        "must not exceed max_syn_streams",
    )
    routing = MINIMAL + "\n[limits]\nmax_routes = 8\nmax_routes_per_neighbour = 4\n"
    core = load_config(write(tmp_path, routing), cpu_count=1).limits.core_limits()
    assert (core.max_routes, core.max_routes_per_neighbour) == (8, 4)
    assert_error(
        tmp_path,
        MINIMAL + "\n[limits]\nmax_routes = 8\n",
        "limits.max_routes_per_neighbour",
        "must not exceed max_routes",
    )
    assert_error(
        tmp_path, MINIMAL + "\n[limits]\nmax_syn_streams = 0\n", "limits.max_syn_streams", "least"
    )


# -- per-hop recovery -------------------------------------------------------------------------


def test_hop_recovery_defaults_to_auto_and_takes_its_header_from_the_mtu(tmp_path: Path) -> None:
    (u,) = load_config(write(tmp_path, MINIMAL)).interfaces
    assert u.hop_recovery == "auto" and u.link_overhead == 16
    for mode, overhead in (("on", 16), ("off", 0)):
        (u,) = load_config(write(tmp_path, MINIMAL + f'hop_recovery = "{mode}"\n')).interfaces
        assert (u.hop_recovery, u.link_overhead) == (mode, overhead)
    (r,) = load_config(write(tmp_path, RADIO)).interfaces
    assert r.hop_recovery == "off" and r.link_overhead == 4  # auto is off on a radio
    (r,) = load_config(write(tmp_path, RADIO + 'hop_recovery = "on"\n')).interfaces
    assert r.hop_recovery == "on" and r.link_overhead == 4 + 16


def test_hop_recovery_auto_is_off_where_it_cannot_work(tmp_path: Path) -> None:
    several = "[workers]\nper_interface = 2\n\n" + MINIMAL
    (u,) = load_config(write(tmp_path, several)).interfaces
    assert u.hop_recovery == "off"
    (r,) = load_config(write(tmp_path, RADIO + "mtu = 200\n")).interfaces
    assert r.hop_recovery == "off"  # 200 - 16 leaves no room above the radio minimum


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (MINIMAL + 'hop_recovery = "yes"\n', "must be one of auto, on, off"),
        (MINIMAL + "hop_recovery = true\n", "must be a string"),
        (
            "[workers]\nper_interface = 2\n\n" + MINIMAL + 'hop_recovery = "on"\n',
            '"on" needs [workers] per_interface = 1',
        ),
        (RADIO + 'mtu = 200\nhop_recovery = "on"\n', '"on" needs mtu >= 212 on a radio'),
    ],
)
def test_hop_recovery_bad_value(tmp_path: Path, text: str, reason: str) -> None:
    assert_error(tmp_path, text, "interface[0].hop_recovery", reason)


# -- [dns] -----------------------------------------------------------------------------------


def test_dns_is_off_by_default_and_takes_a_listen_address(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL)).dns.listen is None
    cfg = load_config(write(tmp_path, MINIMAL + '[dns]\nlisten = "127.0.0.1:5353"\n'))
    assert cfg.dns.listen == ("127.0.0.1", 5353)
    assert_error(tmp_path, MINIMAL + '[dns]\nlisten = "localhost:53"\n', "dns.listen", "numeric")
    assert_error(tmp_path, MINIMAL + "[dns]\nport = 53\n", "dns.port", "unknown key")


def test_udp_service_by_protocol(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, svc('protocol = "udp"\n')), cpu_count=4)
    assert cfg.services[0].kind == "udp"
    _, err = load_error(tmp_path, svc('protocol = "udp"\nkind = "tcp"\n'))
    assert "protocol says" in str(err)
