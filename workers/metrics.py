"""Metrics worker: the node's figures on ``/metrics`` in the Prometheus text format.

Started by the supervisor when ``[metrics] listen`` is set, as its own process so
that a scraper (or a slow one) never costs the control worker's loop more than one
control request per scrape. Each scrape asks the control worker for one snapshot
(``{"cmd": "metrics"}``, built by :func:`snapshot` from the figures ``status --json``
shows: every worker's report, neighbours, routes, streams) and reads the memory of
every process from ``/proc/PID/smaps_rollup``; :func:`families` turns that into
metric families, which ``prometheus_client`` serves. The names, labels and units
are listed in docs/metrics.md; they are stable.

Labels: ``role`` (supervisor, control, crypto, interface, radio, tun, metrics),
``worker`` (the worker's index within its role), ``iface`` (the interface name, for
interface and radio workers and per-neighbour figures), ``peer`` (a whole SID in hex).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from http.server import HTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector, CollectorRegistry

from meshpipe import __version__, log
from meshpipe.config import load_config
from meshpipe.errors import MeshpipeError
from meshpipe_workers.control_client import request
from meshpipe_workers.reload import follow_log_level
from meshpipe_workers.stopflag import StopFlag

if TYPE_CHECKING:
    from meshpipe_workers.control import ControlWorker

PREFIX = "meshpipe_"
WORKER_LABELS = ["role", "worker", "iface"]
SCRAPE_TIMEOUT = 3.0  # the control request of one scrape
Memory = Callable[[int], tuple[int, int] | None]


# -- the control worker's side -----------------------------------------------------------


def snapshot(w: ControlWorker) -> dict[str, Any]:
    """Everything one scrape needs, as plain JSON (the control worker's ``metrics``)."""
    now = time.monotonic()
    control = Counter(w.core.counters)
    control.update(w.counters)
    workers: list[dict[str, Any]] = [
        {"role": "control", "worker": 0, "iface": "", "counters": dict(control), "queues": {}}
    ]
    for (iface, k), body in sorted(w.worker_reports.items()):
        icfg = w.cfg.interfaces[iface] if iface < len(w.cfg.interfaces) else None
        queues = {"rx": [body.get("rx_ring_depth", 0), body.get("rx_ring_dropped", 0)]}
        if "crypto_ring_depth" in body:
            queues["crypto"] = [body["crypto_ring_depth"], body.get("crypto_ring_dropped", 0)]
        workers.append(
            {
                "role": "radio" if icfg is not None and icfg.kind == "radio" else "interface",
                "worker": k,
                "iface": icfg.name if icfg else str(iface),
                "counters": body.get("counters", {}),
                "queues": queues,
            }
        )
    for k, body in sorted(w.crypto_reports.items()):
        workers.append(
            {
                "role": "crypto",
                "worker": k,
                "iface": "",
                "counters": body.get("counters", {}),
                "queues": {"in": [body.get("in_queue_depth", 0), body.get("in_queue_dropped", 0)]},
                "sessions": len(body.get("sessions", [])),
                "tunnel_peers": body.get("tunnel_peers", 0),
            }
        )
    streams: Counter[str] = Counter(s.mode.name.lower() for s in w.core.msp.streams())
    streams.update(str(r.get("mode", "reliable")) for r in w.moved_streams())
    services = w.core.services(now)
    return {
        "sid": str(w.identity.sid),
        "name": w.cfg.node.name or "",
        "version": __version__,
        "uptime_s": now - w.started,
        "workers": workers,
        "neighbours": [
            {
                "peer": bytes(n.sid).hex(),
                "iface": n.iface_name,
                "loss_in": n.loss_in,
                "loss_out": n.loss_out,
                "rtt_s": n.rtt_ms / 1000.0,
                "cost": n.cost,
            }
            for n in w.core.neighbours()
        ],
        "routes": [
            {"peer": bytes(r.sid).hex(), "iface": r.iface_name, "hops": r.hops, "metric": r.metric}
            for r in w.core.routes()
        ],
        "streams": dict(streams),
        "services_local": sum(1 for s in services if s["hops"] == 0),
        "services_known": sum(1 for s in services if s["hops"] != 0),
        "supervisor": w.supervisor_state,
    }


# -- process memory ------------------------------------------------------------------------


PAGE = os.sysconf("SC_PAGE_SIZE")
PSS_MAX_AGE = 10.0  # seconds; reading smaps_rollup costs about 1 ms a process


def read_rss(pid: int) -> int | None:
    """Resident bytes from /proc/PID/statm (cheap); None if the process is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def read_rollup(pid: int) -> dict[str, int] | None:
    """/proc/PID/smaps_rollup in bytes (``Pss``, ``Private_Clean``, ...; the kernel
    walks every mapping for it); None if the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(b":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == b"kB":
            out[key.decode()] = int(parts[0]) * 1024
    return out


def read_pss(pid: int) -> int | None:
    """Proportional set size in bytes; None if the process is gone."""
    rollup = read_rollup(pid)
    return None if rollup is None else rollup.get("Pss")


def uss_of(rollup: dict[str, int]) -> int:
    """Unique set size: the pages only this process maps."""
    return rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)


class MemoryReader:
    """(RSS, PSS) of a process: RSS read on every scrape, PSS at most PSS_MAX_AGE old."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.pss: dict[int, tuple[float, int]] = {}  # pid -> (read at, bytes)

    def __call__(self, pid: int) -> tuple[int, int] | None:
        rss = read_rss(pid)
        if rss is None:
            self.pss.pop(pid, None)
            return None
        now = self.clock()
        cached = self.pss.get(pid)
        if cached is None or now - cached[0] >= PSS_MAX_AGE:
            pss = read_pss(pid)
            if pss is None:
                return None
            cached = (now, pss)
            self.pss[pid] = cached
        return rss, cached[1]

    def forget_except(self, pids: set[int]) -> None:
        for pid in set(self.pss) - pids:
            del self.pss[pid]


def role_labels(role: str) -> list[str]:
    """The supervisor's role string (``interface:udp0:1``) as [role, worker, iface]."""
    parts = role.split(":")
    if parts[0] == "interface" and len(parts) == 3:
        return ["interface", parts[2], parts[1]]
    if parts[0] == "radio" and len(parts) == 2:
        return ["radio", "0", parts[1]]
    if len(parts) == 2:
        return [parts[0], parts[1], ""]
    return [parts[0], "0", ""]


# -- metric families ---------------------------------------------------------------------


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=labels or [])


def families(snap: dict[str, Any], memory: Memory) -> list[Metric]:
    """The metric families for one snapshot (see docs/metrics.md)."""
    out: list[Metric] = []
    info = _gauge("info", "This node (always 1).", ["sid", "name", "version"])
    info.add_metric([snap["sid"], snap["name"], snap["version"]], 1)
    out.append(info)
    up = _gauge("uptime_seconds", "Seconds since the control worker started.")
    up.add_metric([], snap["uptime_s"])
    out.append(up)

    counters = CounterMetricFamily(
        PREFIX + "events",
        "A worker's counter; `name` is its dotted name (see docs/metrics.md).",
        labels=[*WORKER_LABELS, "name"],
    )
    depth = _gauge(
        "queue_depth_bytes", "Bytes waiting in a worker's input ring.", [*WORKER_LABELS, "queue"]
    )
    dropped = CounterMetricFamily(
        PREFIX + "queue_dropped",
        "Records dropped because a worker's ring was full.",
        labels=[*WORKER_LABELS, "queue"],
    )
    sessions = _gauge("sessions", "End-to-end sessions held by a crypto worker.", WORKER_LABELS)
    tunnel = _gauge("tunnel_peers", "Peers with a tunnel stream in a crypto worker.", WORKER_LABELS)
    for wk in snap["workers"]:
        labels = [wk["role"], str(wk["worker"]), wk["iface"]]
        for name, value in sorted(wk["counters"].items()):
            counters.add_metric([*labels, name], value)
        for queue, (d, n) in sorted(wk["queues"].items()):
            depth.add_metric([*labels, queue], d)
            dropped.add_metric([*labels, queue], n)
        if "sessions" in wk:
            sessions.add_metric(labels, wk["sessions"])
            tunnel.add_metric(labels, wk["tunnel_peers"])
    out += [counters, depth, dropped, sessions, tunnel]

    nbs = snap["neighbours"]
    n = _gauge("neighbours", "Neighbours currently heard.")
    n.add_metric([], len(nbs))
    out.append(n)
    per_nb = [
        ("neighbour_loss_in_ratio", "loss_in", "Fraction of the neighbour's hellos we miss."),
        ("neighbour_loss_out_ratio", "loss_out", "Fraction of our hellos the neighbour misses."),
        ("neighbour_rtt_seconds", "rtt_s", "Smoothed hello round trip (0 until measured)."),
        ("neighbour_cost", "cost", "Link cost used by routing (65535: unusable)."),
    ]
    for metric, key, doc in per_nb:
        g = _gauge(metric, doc, ["peer", "iface"])
        for nb in nbs:
            g.add_metric([nb["peer"], nb["iface"]], nb[key])
        out.append(g)

    routes = snap["routes"]
    r = _gauge("routes", "Selected routes.")
    r.add_metric([], len(routes))
    out.append(r)
    for metric, key, doc in (
        ("route_metric", "metric", "Metric of the selected route to a node."),
        ("route_hops", "hops", "Hop count of the selected route to a node."),
    ):
        g = _gauge(metric, doc, ["peer", "iface"])
        for rt in routes:
            g.add_metric([rt["peer"], rt["iface"]], rt[key])
        out.append(g)

    st = _gauge("streams", "Open MSP streams of the control worker, by mode.", ["mode"])
    for mode in ("reliable", "deadline", "datagram"):
        st.add_metric([mode], snap["streams"].get(mode, 0))
    out.append(st)
    svc = _gauge("services", "Services: offered by this node (local) or discovered.", ["origin"])
    svc.add_metric(["local"], snap["services_local"])
    svc.add_metric(["remote"], snap["services_known"])
    out.append(svc)
    out += _process_families(snap.get("supervisor") or {}, memory)
    return out


def _process_families(sup: dict[str, Any], memory: Memory) -> list[Metric]:
    rss = _gauge("worker_rss_bytes", "Resident memory of a process.", WORKER_LABELS)
    pss = _gauge("worker_pss_bytes", "Proportional set size of a process.", WORKER_LABELS)
    up = _gauge("worker_up", "1 while the process runs, 0 while it awaits restart.", WORKER_LABELS)
    restarts = CounterMetricFamily(
        PREFIX + "worker_restarts", "Times the supervisor restarted a worker.", labels=WORKER_LABELS
    )
    procs: list[tuple[list[str], int | None, int | None]] = []
    if sup.get("pid"):
        procs.append((["supervisor", "0", ""], int(sup["pid"]), None))
    for w in sup.get("workers", []):
        procs.append((role_labels(str(w["role"])), w.get("pid"), int(w.get("restarts", 0))))
    for labels, pid, count in procs:
        mem = memory(pid) if pid else None
        up.add_metric(labels, 1 if mem is not None else 0)
        if mem is not None:
            rss.add_metric(labels, mem[0])
            pss.add_metric(labels, mem[1])
        if count is not None:
            restarts.add_metric(labels, count)
    return [rss, pss, up, restarts]


class NodeCollector(Collector):
    """Asks the control worker for a snapshot on every scrape."""

    def __init__(self, control_socket: str) -> None:
        self.control_socket = control_socket
        self.memory = MemoryReader()

    def collect(self) -> Iterable[Metric]:
        try:
            snap = request(self.control_socket, "metrics", timeout=SCRAPE_TIMEOUT)
        except MeshpipeError as exc:
            log.get().warning("metrics.scrape_failed", error=str(exc))
            g = _gauge("control_up", "1 when the control worker answered this scrape.")
            g.add_metric([], 0)
            return [g]
        g = _gauge("control_up", "1 when the control worker answered this scrape.")
        g.add_metric([], 1)
        sup = snap.get("supervisor") or {}
        pids = {int(w["pid"]) for w in sup.get("workers", []) if w.get("pid")}
        self.memory.forget_except(pids | {int(sup.get("pid") or 0)})
        return [g, *families(snap, self.memory)]


def _server(host: str, port: int, registry: CollectorRegistry) -> HTTPServer:
    """prometheus_client's request handler on a plain, one-request-at-a-time server:
    no thread per scrape and no WSGI layer (together two thirds of a scrape's CPU)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    cls = type("MetricsServer", (HTTPServer,), {"address_family": family})
    server: HTTPServer = cls((host, port), MetricsHandler.factory(registry))
    server.timeout = 1.0  # handle_request returns, so the stop flag is seen
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshpipe-metrics-worker")
    p.add_argument("--config", required=True)
    p.add_argument("--sid", required=True)
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    log.configure(node=a.sid[:8], role="metrics", level=cfg.node.log_level)
    if cfg.metrics.listen is None:
        log.get().error("metrics.start_failed", error="[metrics] listen is not set")
        return 3
    host, port = cfg.metrics.listen
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(cfg.node.control_socket))
    try:
        server = _server(host, port, registry)
    except OSError as exc:
        log.get().error("metrics.start_failed", listen=f"{host}:{port}", error=str(exc))
        return 3
    log.get().info("metrics.start", listen=f"{host}:{port}")
    stop = StopFlag()
    # The only setting a running metrics worker takes over is the log level; a new
    # listen address makes the supervisor start a new worker instead.
    follow_log_level(a.config)
    while not stop:
        server.handle_request()  # one scrape at a time, or a 1 s timeout
    server.server_close()
    log.get().info("metrics.stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
