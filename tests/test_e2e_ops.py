"""Operating a node, with real processes across A-B-C-D: metrics scraped by a real
Prometheus, `meshpipe reload` during a transfer, a refused config, a clean SIGTERM.

Bounds (stated in README "Operating"):

- Prometheus (Debian's, started here inside A's namespace on loopback, with its own
  config and data dir) scrapes A every second; a PromQL query over its HTTP API gives
  A's neighbour count (1); `promtool check metrics` passes on A's raw /metrics;
  serving a scrape costs under SCRAPE_CPU_BOUND of CPU time (under 1% of a core at one
  scrape a second);
- a `[[service]]` added to D's file and `meshpipe reload` on D: A lists it within
  DISCOVER_BOUND s, while a 20 MB `msp` transfer into D (slowed by tbf so it spans the
  reload) completes byte-exact; a broken file is refused (non-zero exit, file, key and
  reason) and D runs on as before;
- SIGTERM to D: A's route to D and D's services are gone from A within GONE_BOUND s
  (the timers here are the production defaults, so only the goodbye can be that fast:
  C would time D out after 4 s), and D's supervisor exits within STOP_BOUND s.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshpipe_workers.control_client import request
from meshpipe_workers.labnet import Lab
from tests.netns import require_root
from tests.test_e2e_msp import _listen as listen_on_d

pytestmark = pytest.mark.netns

METRICS = "127.0.0.1:9464"  # in A's namespace
PROM = "127.0.0.1:19090"  # Prometheus's own HTTP API, in A's namespace
DISCOVER_BOUND = 10.0
GONE_BOUND = 3.0
STOP_BOUND = 15.0  # the unit's TimeoutStopSec
START_BOUND = 90.0
SCRAPE_CPU_BOUND = 0.010  # seconds of CPU per scrape: 1% of a core at 1 scrape/s
# Production timers: a vanished neighbour is noticed after 4 s, not sooner.
TIMING = {
    "hello_interval": 1.0,
    "neighbour_timeout": 4.0,
    "update_interval": 4.0,
    "route_expiry": 14.0,
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    metrics = f'\n[metrics]\nlisten = "{METRICS}"\n'
    with Lab(
        ["a", "b", "c", "d"],
        tmp_path_factory.mktemp("ops"),
        netns=True,
        timing=TIMING,
        node_config={"a": metrics},
    ) as lab:
        lab.start_all(timeout=START_BOUND)  # generous: a loaded machine starts them slowly
        lab.wait_for(lambda: (r := lab.route("a", "d")) and r["hops"] == 3, 40, "a's route to d")
        yield lab


def curl(lab: Lab, name: str, url: str) -> bytes:
    assert lab.topo is not None
    res = subprocess.run(
        ["ip", "netns", "exec", lab.topo.ns(name), "curl", "-sS", "--max-time", "10", url],
        capture_output=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids(lab: Lab, name: str) -> dict[str, int]:
    st = lab.cli(name, "status")
    return {w["role"]: w["pid"] for w in st["supervisor"]["workers"] if w["pid"]}


def prom_query(lab: Lab, query: str) -> list[dict[str, Any]]:
    url = f"http://{PROM}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    body = json.loads(curl(lab, "a", url))
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_prometheus_scrapes_a_and_promtool_accepts_it(lab: Lab, tmp_path: Path) -> None:
    assert lab.topo is not None
    raw = curl(lab, "a", f"http://{METRICS}/metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=raw, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert b"# TYPE meshpipe_neighbours gauge" in raw and b"meshpipe_neighbours 1.0" in raw

    # The cost of one scrape: CPU time of the metrics worker and of the control
    # worker's share (its idle rate measured first and taken off).
    pids = worker_pids(lab, "a")
    control, metrics = pids["control"], pids["metrics"]
    t0, c0 = time.monotonic(), cpu_seconds(control)
    time.sleep(5.0)
    idle_rate = (cpu_seconds(control) - c0) / (time.monotonic() - t0)
    n = 30
    t0, c0, m0 = time.monotonic(), cpu_seconds(control), cpu_seconds(metrics)
    for _ in range(n):
        curl(lab, "a", f"http://{METRICS}/metrics")
    took = time.monotonic() - t0
    spent = cpu_seconds(metrics) - m0 + max(0.0, cpu_seconds(control) - c0 - idle_rate * took)
    per_scrape = spent / n
    print(f"one scrape: {per_scrape * 1000:.2f} ms CPU ({len(raw)} bytes)")
    assert per_scrape < SCRAPE_CPU_BOUND

    # A real Prometheus, in A's namespace, on loopback, with its own config and data.
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: meshpipe\n"
        f"    static_configs:\n      - targets: ['{METRICS}']\n"
    )
    data = tmp_path / "prom-data"
    data.mkdir()
    log = (tmp_path / "prometheus.log").open("wb")
    prom = lab.topo.exec(
        "a",
        [
            "prometheus",
            f"--config.file={cfg}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address={PROM}",
        ],
        stdout=log,
        stderr=log,
    )
    try:

        def neighbours() -> list[dict[str, Any]]:
            try:
                return prom_query(lab, 'meshpipe_neighbours{job="meshpipe"}')
            except AssertionError:
                return []  # not up yet

        result = lab.wait_for(neighbours, 60, "prometheus to scrape a", interval=1.0)
        assert result[0]["value"][1] == "1"
        up = prom_query(lab, 'up{job="meshpipe"}')
        assert up and up[0]["value"][1] == "1"
        # Per-neighbour and per-worker series carry their labels.
        cost = prom_query(lab, "meshpipe_neighbour_cost")
        assert cost and cost[0]["metric"]["peer"] == lab.nodes["b"].sid
        rss = prom_query(lab, 'meshpipe_worker_rss_bytes{role="control"}')
        assert rss and float(rss[0]["value"][1]) > 1 << 20
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        log.close()


def _tbf(lab: Lab, on: bool) -> None:
    """Slow C -> D to 40 Mbit/s, so a 20 MB transfer lasts about 4 s or more."""
    assert lab.topo is not None
    link = next(ln for ln in lab.topo.links if {ln.left, ln.right} == {"c", "d"})
    argv = ["tc", "qdisc", "add" if on else "del", "dev", link.ifname, "root"]
    if on:
        argv += ["tbf", "rate", "40mbit", "burst", "64kb", "latency", "400ms"]
    lab.topo.run("c", argv, timeout=10)


def test_reload_adds_a_service_during_a_transfer_and_refuses_a_broken_file(
    lab: Lab, tmp_path: Path
) -> None:
    d = lab.nodes["d"]
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(os.urandom(20 * 1000 * 1000))
    listener = listen_on_d(lab, 5000, dst)
    good = d.config.read_text()
    pids_before = worker_pids(lab, "d")
    _tbf(lab, True)
    try:
        with src.open("rb") as stdin:
            sender = lab.popen(
                "a",
                "msp",
                "connect",
                d.sid[:16],
                "5000",
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            lab.wait_for(lambda: dst.stat().st_size > 1_000_000, 30, "the transfer to start")
            d.config.write_text(
                good + '\n[[service]]\nname = "late"\nto = "127.0.0.1:8080"\nallow = "any"\n'
            )
            t0 = time.monotonic()
            res = lab.run("d", "reload", "--json")
            assert res.returncode == 0, res.stderr
            assert json.loads(res.stdout)["live"] == ["service"]
            assert sender.poll() is None, "the transfer ended before the reload"

            def listed() -> bool:
                rows = lab.cli("a", "services") or []
                return any(r["name"] == "late" and r["sid"] == d.sid for r in rows)

            lab.wait_for(listed, DISCOVER_BOUND, "a to discover d's new service", interval=0.2)
            print(f"service listed at a {time.monotonic() - t0:.1f} s after the reload")
            _, err = sender.communicate(timeout=180)
    finally:
        _tbf(lab, False)
    assert sender.returncode == 0, err
    assert listener.wait(30) == 0
    digest = hashlib.sha256
    assert digest(dst.read_bytes()).digest() == digest(src.read_bytes()).digest()
    assert worker_pids(lab, "d") == pids_before  # no worker was restarted
    reloaded = [e for e in lab.log_events("d") if e.get("event") == "config.reloaded"]
    assert reloaded and reloaded[-1]["applied"] == ["service"]

    # A file that does not validate: refused with file, key and reason; D runs on.
    d.config.write_text(d.config.read_text().replace('name = "late"', 'name = "late"\nport = "x"'))
    res = lab.run("d", "reload")
    assert res.returncode != 0
    assert str(d.config) in res.stderr and "service[0].port" in res.stderr, res.stderr
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)  # systemctl reload's way (kill -HUP): refused too
    lab.wait_for(
        lambda: (
            len([e for e in lab.log_events("d") if e.get("event") == "config.reload_refused"]) >= 2
        ),
        10,
        "both refusals in d's log",
    )
    refused = next(e for e in lab.log_events("d") if e.get("event") == "config.reload_refused")
    assert refused["file"] == str(d.config) and refused["key"] == "service[0].port"
    assert refused["reason"]
    # The CLI cannot read the broken file; ask the running node on its socket.
    sock = str(d.dir / "control.sock")
    assert request(sock, "id")["sid"] == d.sid
    st = request(sock, "status")
    assert {w["role"]: w["pid"] for w in st["supervisor"]["workers"]} == pids_before
    assert any(r["name"] == "late" for r in request(sock, "services"))
    d.config.write_text(good)


def test_sigterm_retracts_routes_and_services_at_once(lab: Lab) -> None:
    d = lab.nodes["d"]
    res = lab.run("d", "expose", "web", "--to", "127.0.0.1:8000", "--any")
    assert res.returncode == 0, res.stderr

    def d_services_at_a() -> list[dict[str, Any]]:
        return [r for r in lab.cli("a", "services") or [] if r["sid"] == d.sid]

    lab.wait_for(d_services_at_a, DISCOVER_BOUND, "a to list d's web")
    assert lab.route("a", "d") is not None
    assert d.proc is not None
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    lab.wait_for(
        lambda: lab.route("a", "d") is None and not d_services_at_a(),
        GONE_BOUND + 5,
        "d's route and services to go from a",
        interval=0.1,
    )
    gone = time.monotonic() - t0
    d.proc.wait(STOP_BOUND)
    stopped = time.monotonic() - t0
    print(f"d gone from a after {gone:.2f} s; d's supervisor exited after {stopped:.2f} s")
    assert gone < GONE_BOUND
    events = [e["event"] for e in lab.log_events("d")]
    assert "control.farewell" in events and "node.stop" in events
    d.proc = None
