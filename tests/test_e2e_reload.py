"""What `meshpipe reload` applies live, with real processes on loopback (no root):
a service's ACL, the exit, static peers, the log level and the metrics worker.

X and Y on loopback UDP. Y offers ``svc`` (target 127.0.0.1:1, where nothing
listens) closed to everyone: X's stream is denied by the ACL. After Y's file opens it
to any node and Y reloads, the stream passes the ACL and is refused by the target
instead. Y's exit, a second static peer, the log level and `[metrics]` come and go the
same way, and no worker is restarted by any of it.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from meshpipe_workers.labnet import Lab
from tests.netns import loopback_ports

SVC = '\n[[service]]\nname = "svc"\nto = "127.0.0.1:1"\nport = 6000\nallow = []\n'


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    port = loopback_ports()  # x, y; the metrics port is port + 7
    with Lab(
        ["x", "y"],
        tmp_path_factory.mktemp("reload"),
        netns=False,
        base_port=port,
        node_config={"y": SVC},
    ) as lab:
        lab.start_all(timeout=90)  # generous: on a loaded machine processes start slowly
        lab.wait_for(lambda: lab.route("x", "y"), 30, "x's route to y")
        yield lab


def reload(lab: Lab, name: str) -> dict[str, Any]:
    res = lab.run(name, "reload", "--json")
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def pids(lab: Lab, name: str) -> dict[str, int]:
    return {w["role"]: w["pid"] for w in lab.cli(name, "status")["supervisor"]["workers"]}


def reloaded(lab: Lab, name: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` config.reloaded events of ``name`` (waits for them)."""

    def got() -> list[dict[str, Any]]:
        evs = [e for e in lab.log_events(name) if e.get("event") == "config.reloaded"]
        return evs if len(evs) >= n else []

    return lab.wait_for(got, 10, f"{n} reloads applied on {name}")


def connect_error(lab: Lab) -> str:
    res = lab.run("x", "msp", "connect", lab.nodes["y"].sid, "6000", timeout=60)
    assert res.returncode != 0
    return res.stderr


def test_acl_exit_peers_log_level_and_metrics_change_live(lab: Lab) -> None:
    y = lab.nodes["y"]
    good = y.config.read_text()
    before = pids(lab, "y")
    assert "denied" in connect_error(lab)

    y.config.write_text(good.replace("allow = []", 'allow = "any"'))
    assert reload(lab, "y") == {
        "file": str(y.config),
        "live": ["service[0].allow"],
        "restart_needed": [],
    }
    reloaded(lab, "y", 1)
    assert "refused" in connect_error(lab)  # past the ACL now; nothing listens at the target

    # The exit, one more static peer, the log level and a wrong-in-place key at once.
    text = good.replace("allow = []", 'allow = "any"')
    text = text.replace("peers = []", 'peers = ["127.0.0.1:9"]')
    text = text.replace("[timing]", '[exit]\nenabled = true\nallow = "any"\n\n[timing]')
    text = text.replace('name = "y"', 'name = "y"\nlog_level = "debug"')
    text = text.replace("hello_interval = 0.5", "hello_interval = 0.4")
    y.config.write_text(text)
    out = reload(lab, "y")
    assert set(out["live"]) == {
        "node.log_level",
        "interface[0].peers",
        "exit.enabled",
        "exit.allow",
    }
    assert out["restart_needed"] == ["timing.hello_interval"]
    ev = reloaded(lab, "y", 2)[1]
    assert set(ev["applied"]) == set(out["live"]) and ev["failed"] == []
    lab.wait_for(
        lambda: any(
            r["name"] == "exit" and r["sid"] == y.sid for r in lab.cli("x", "services") or []
        ),
        10,
        "x to discover y's exit",
    )

    # [metrics] added: a metrics worker starts; removed: it stops. Nothing else restarts.
    mport = lab.base_port + 7
    y.config.write_text(text + f'\n[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    assert reload(lab, "y")["live"] == ["metrics.listen"]
    url = f"http://127.0.0.1:{mport}/metrics"

    def scraped() -> bytes:
        try:
            body: bytes = urllib.request.urlopen(url, timeout=5).read()
            return body
        except (urllib.error.URLError, OSError):
            return b""

    body = lab.wait_for(scraped, 30, "y's metrics worker")
    assert b"meshpipe_neighbours 1.0" in body
    y.config.write_text(text)
    assert reload(lab, "y")["live"] == ["metrics.listen"]
    lab.wait_for(lambda: "metrics" not in pids(lab, "y"), 10, "the metrics worker to stop")
    time.sleep(0.5)
    assert scraped() == b""
    assert pids(lab, "y") == before
    y.config.write_text(good)
