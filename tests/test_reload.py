"""workers/reload.py without a node: which keys changed, which are live, how a
handler's result becomes the running config, and a refused file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshpipe.config import Config, parse_config
from meshpipe.errors import ConfigError
from meshpipe_workers.reload import Reloader, changed_keys, control_socket_of, load_for_reload

BASE = """
[node]
key = "node.key"
log_level = "info"

[[interface]]
name = "udp0"
kind = "udp"
listen = "127.0.0.1:7700"
peers = ["127.0.0.1:7701"]
"""


def cfg(extra: str = "", base: str = BASE) -> Config:
    return parse_config(base + extra, "/etc/meshpipe/meshpipe.toml", cpu_count=2)


SERVICE = '\n[[service]]\nname = "web"\nto = "127.0.0.1:8000"\nallow = "any"\n'


def test_changed_keys_name_sections_fields_and_array_items() -> None:
    old = cfg()
    assert changed_keys(old, cfg()) == []
    new = cfg(SERVICE + '\n[metrics]\nlisten = "127.0.0.1:9464"\n', BASE.replace("info", "debug"))
    assert changed_keys(old, new) == ["node.log_level", "service", "metrics.listen"]
    peers = cfg(base=BASE.replace("7701", "7702"))
    assert changed_keys(old, peers) == ["interface[0].peers"]
    listen = cfg(base=BASE.replace("7700", "7710"))
    assert changed_keys(old, listen) == ["interface[0].listen"]


def test_reloader_applies_live_keys_and_reports_the_rest() -> None:
    calls: list[str] = []
    r = Reloader()

    def node(old: Config, new: Config) -> Any:
        calls.append("node")
        from dataclasses import replace

        return replace(old.node, log_level=new.node.log_level)

    r.register("node", node, live=("log_level",))
    r.register("service", lambda _o, n: calls.append("service") or n.services)
    with pytest.raises(ValueError):
        r.register("node", node)
    old = cfg()
    new = cfg(SERVICE, BASE.replace("info", "debug").replace("7700", "7710"))
    live, restart = r.plan(old, new)
    assert live == ["node.log_level", "service"] and restart == ["interface[0].listen"]
    out = r.apply(old, new)
    assert calls == ["node", "service"]
    assert out.config.node.log_level == "debug" and out.config.services == new.services
    assert out.config.interfaces == old.interfaces  # not live: the running value stays
    assert out.applied == live and out.restart_needed == restart and out.failed == []


def test_a_failing_handler_keeps_its_section() -> None:
    r = Reloader()

    def boom(_o: Config, _n: Config) -> Any:
        raise RuntimeError("bug")

    r.register("service", boom)
    old = cfg()
    out = r.apply(old, cfg(SERVICE))
    assert out.failed == ["service"] and out.applied == [] and out.config.services == ()


def test_metrics_section_validation() -> None:
    assert cfg().metrics.listen is None
    assert cfg('\n[metrics]\nlisten = "[::1]:9464"\n').metrics.listen == ("::1", 9464)
    with pytest.raises(ConfigError) as exc:
        cfg('\n[metrics]\nlisten = "0.0.0.0:9464"\n')
    assert exc.value.key == "metrics.listen"
    with pytest.raises(ConfigError) as exc:
        cfg("\n[metrics]\nport = 9464\n")
    assert exc.value.key == "metrics.port"


def test_refused_file_names_file_key_and_reason(tmp_path: Path) -> None:
    p = tmp_path / "meshpipe.toml"
    p.write_text(
        BASE.replace('log_level = "info"', 'log_level = "loud"\ncontrol_socket = "c.sock"')
    )
    with pytest.raises(ConfigError) as exc:
        load_for_reload(str(p))
    assert exc.value.path == str(p) and exc.value.key == "node.log_level"
    # The CLI still finds the node to tell it (and the node refuses and logs it).
    assert control_socket_of(str(p)) == str(tmp_path / "c.sock")
    p.write_text("not toml [")
    assert control_socket_of(str(p)) == "/run/meshpipe/control.sock"
