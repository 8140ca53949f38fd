"""Real processes on loopback UDP (no root needed): the non-root demo's path.

Three nodes in a line over configured unicast peers, two interface workers per
interface (SO_REUSEPORT), ping across two hops, and CLI behaviour.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpipe_workers.labnet import Lab
from tests.netns import loopback_ports

WORKERS = "[workers]\nper_interface = 2\ncrypto = 2\n"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    port = loopback_ports()
    with Lab(
        ["x", "y", "z"],
        tmp_path_factory.mktemp("lo"),
        netns=False,
        base_port=port,
        extra_config=WORKERS,
    ) as lab:
        lab.start_all()
        lab.wait_for(lambda: (r := lab.route("x", "z")) and r["hops"] == 2, 30, "x's route to z")
        yield lab


def test_two_interface_workers_and_two_crypto_workers(lab: Lab) -> None:
    st = lab.cli("y", "status")
    roles = sorted(w["role"] for w in st["supervisor"]["workers"])
    assert roles == ["control", "crypto:0", "crypto:1", "interface:udp0:0", "interface:udp0:1"]
    assert st["neighbours"] == 2
    lab.wait_for(
        lambda: sum(w["role"] == "crypto" for w in lab.cli("y", "status")["workers"]) == 2,
        10,
        "reports from both crypto workers",
    )


def test_ping_two_hops_on_loopback(lab: Lab) -> None:
    res = lab.cli("x", "ping", lab.nodes["z"].sid[:8], "--count", "3", "--interval", "0.1")
    assert res["received"] == 3 and res["hops"] == 2


def test_cli_errors_are_plain(lab: Lab) -> None:
    out = lab.cli_text("x", "ping", "0123")
    assert "at least 8" in out
    out = lab.cli_text("x", "ping", "zzzzzzzzzz")
    assert "not hex" in out


def test_cli_against_stopped_node_fails_plainly(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "meshpipe", "init", "--dir", str(tmp_path / "n")],
        check=True,
        capture_output=True,
    )
    cfg = tmp_path / "n" / "meshpipe.toml"
    for cmd in ("routes", "status", "peers", "sessions", "topology", "resolve"):
        args = [cmd, "x"] if cmd == "resolve" else [cmd]
        res = subprocess.run(
            [sys.executable, "-m", "meshpipe", *args, "-c", str(cfg)],
            capture_output=True,
            text=True,
        )
        assert res.returncode != 0
        assert "not running" in res.stderr
    # id is answered from the config and the key file
    res = subprocess.run(
        [sys.executable, "-m", "meshpipe", "id", "-c", str(cfg)], capture_output=True, text=True
    )
    assert res.returncode == 0 and "ipv6: fd" in res.stdout


def test_run_refuses_bad_key_and_bad_config(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "meshpipe", "init", "--dir", str(tmp_path / "n")],
        check=True,
        capture_output=True,
    )
    key = tmp_path / "n" / "node.key"
    key.chmod(0o644)
    res = subprocess.run(
        [sys.executable, "-m", "meshpipe", "run", "-c", str(tmp_path / "n" / "meshpipe.toml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2 and "chmod 600" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nkey = "n/node.key"\ncolour = "blue"\n')
    res = subprocess.run(
        [sys.executable, "-m", "meshpipe", "run", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2 and "colour" in res.stderr and str(bad) in res.stderr
