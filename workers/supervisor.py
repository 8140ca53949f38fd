"""Supervisor: the process `meshpipe run` becomes.

It creates the shared-memory rings, starts the control, interface (or radio), crypto
and TUN workers, restarts a worker that dies (logging `worker.restarted`), reports
readiness and watchdog pings to systemd, and tears everything down on SIGTERM.
Rings and their eventfds belong to the supervisor, so a restarted worker simply
attaches to the same rings again.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field, replace
from typing import Any

from meshpipe import log
from meshpipe.config import Config
from meshpipe.errors import ConfigError
from meshpipe.identity import Identity
from meshpipe_workers import messages as msg
from meshpipe_workers import reload, sdnotify
from meshpipe_workers.ring import Ring
from meshpipe_workers.zygote import WorkerProc, Zygote, ZygoteError, reap_strangers

RESTART_BACKOFF_MAX = 10.0
STABLE_AFTER = 30.0  # a worker that ran this long starts again with the first backoff
POLL = 0.2  # until the control socket answers; then the loop sleeps until an event
# On SIGTERM the control worker goes first and says goodbye (route retractions,
# service withdrawals) through the interface workers, which must still be running.
CONTROL_STOP_WAIT = 3.0
STOP_WAIT = 5.0  # then SIGKILL; the unit's TimeoutStopSec leaves room for both


@dataclass
class WorkerSpec:
    role: str  # "control", "interface:<name>:<k>", "radio:<name>", "crypto:<k>", "tun"
    module: str  # its main(argv) runs in a process forked from the zygote
    argv: list[str]
    fds: list[int]
    proc: WorkerProc | None = None
    restarts: int = 0
    next_start: float = 0.0
    backoff: float = 0.5
    started_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Supervisor:
    def __init__(self, cfg: Config, config_path: str, identity: Identity) -> None:
        self.cfg = cfg
        self.config_path = os.path.abspath(config_path)
        self.identity = identity
        # First, while this process holds nothing but its config: the clean parent
        # of every worker (workers/zygote.py).
        self.zygote = Zygote.fork()
        self.log = log.get()
        self.rings: list[Ring] = []
        self.workers: list[WorkerSpec] = []
        self.stopping = False
        self.reload_wanted = False
        self.ready = False
        self._build()
        self._add_metrics_worker()

    def _ring(self) -> Ring:
        r = Ring.create(self.cfg.limits.ring_bytes)
        self.rings.append(r)
        return r

    def _build(self) -> None:
        """Rings and worker command lines. Every ring has one producer and one consumer:

        - interface worker (i, k): rx/tx with the control worker; per crypto worker c
          a ``dtx`` ring (c sends frames) and, for UDP, a ``drx`` ring (DATA frames
          of c's shard); a radio sends everything up to the control worker;
        - crypto worker c: to/from the control worker; with the tunnel, one ring to
          every other crypto worker (packets its TUN queue read for their peers).
        The TUN worker only owns the device: no rings.
        """
        sid = str(self.identity.sid)
        n_crypto = self.cfg.workers.crypto
        tunnel = self.cfg.tunnel.enabled
        crypto: list[dict[str, Any]] = [
            {"from_ifaces": [], "to_ifaces": []} for _ in range(n_crypto)
        ]
        iface_rings: list[dict[str, Any]] = []
        self.to_control = self._ring()  # supervisor -> control: worker table
        for i, icfg in enumerate(self.cfg.interfaces):
            # A serial radio has one owner: exactly one worker, whatever per_interface says.
            radio = icfg.kind == "radio"
            for k in range(1 if radio else self.cfg.workers.per_interface):
                rx, tx = self._ring(), self._ring()
                dtx = [self._ring() for _ in range(n_crypto)]
                drx = [self._ring() for _ in range(n_crypto)]
                for c in range(n_crypto):
                    crypto[c]["to_ifaces"].append({"iface": i, "ring": dtx[c].spec.to_dict()})
                    if drx:
                        crypto[c]["from_ifaces"].append(drx[c].spec.to_dict())
                iface_rings.append(
                    {"iface": i, "worker": k, "rx": rx.spec.to_dict(), "tx": tx.spec.to_dict()}
                )
                rings = {
                    "rx": rx.spec.to_dict(),
                    "tx": tx.spec.to_dict(),
                    "dtx": [r.spec.to_dict() for r in dtx],
                    "drx": [r.spec.to_dict() for r in drx],
                }
                self.workers.append(
                    WorkerSpec(
                        role=f"radio:{icfg.name}" if radio else f"interface:{icfg.name}:{k}",
                        module="meshpipe_workers.radio" if radio else "meshpipe_workers.interface",
                        argv=[
                            "--config",
                            self.config_path,
                            "--iface",
                            str(i),
                            "--worker",
                            str(k),
                            "--sid",
                            sid,
                            "--rings",
                            json.dumps(rings),
                        ],
                        fds=[r.spec.eventfd for r in (rx, tx, *dtx, *drx)],
                    )
                )
        control_rings: dict[str, Any] = {
            "interfaces": iface_rings,
            "supervisor": self.to_control.spec.to_dict(),
            "crypto": [],
        }
        if tunnel:
            for c in range(n_crypto):
                crypto[c].update(to_peers={}, from_peers=[])
            for c in range(n_crypto):
                for k in range(n_crypto):
                    if k != c:
                        handoff = self._ring()
                        crypto[c]["to_peers"][str(k)] = handoff.spec.to_dict()
                        crypto[k]["from_peers"].append(handoff.spec.to_dict())
        for c in range(n_crypto):
            to, frm = self._ring(), self._ring()
            control_rings["crypto"].append({"to": to.spec.to_dict(), "from": frm.spec.to_dict()})
            crypto[c].update(from_control=to.spec.to_dict(), to_control=frm.spec.to_dict())
            self.workers.append(
                WorkerSpec(
                    role=f"crypto:{c}",
                    module="meshpipe_workers.crypto",
                    argv=[
                        "--config",
                        self.config_path,
                        "--index",
                        str(c),
                        "--count",
                        str(n_crypto),
                        "--rings",
                        json.dumps(crypto[c]),
                    ],
                    fds=_fds(crypto[c]),
                )
            )
        if tunnel:
            self.workers.append(
                WorkerSpec(
                    role="tun",
                    module="meshpipe_workers.tun",
                    argv=[
                        "--config",
                        self.config_path,
                        "--sid",
                        sid,
                    ],
                    fds=[],
                )
            )
        self.workers.insert(
            0,
            WorkerSpec(
                role="control",
                module="meshpipe_workers.control",
                argv=[
                    "--config",
                    self.config_path,
                    "--rings",
                    json.dumps(control_rings),
                ],
                fds=_fds(control_rings),
            ),
        )

    def _add_metrics_worker(self) -> None:
        """The Prometheus endpoint, when ``[metrics] listen`` is set (no rings)."""
        if self.cfg.metrics.listen is None:
            return
        argv = ["--config", self.config_path, "--sid", str(self.identity.sid)]
        self.workers.append(
            WorkerSpec(role="metrics", module="meshpipe_workers.metrics", argv=argv, fds=[])
        )

    def _reload(self) -> None:
        """SIGHUP: validate the file, replace the metrics worker if [metrics] changed,
        take the log level, and pass SIGHUP on (see workers/reload.py)."""
        try:
            new = reload.load_for_reload(self.config_path)
        except ConfigError:
            return
        self.log.info("config.reload", changed=reload.changed_keys(self.cfg, new))
        log.set_level(new.node.log_level)
        metrics_changed = new.metrics != self.cfg.metrics
        self.cfg = replace(
            self.cfg, node=replace(self.cfg.node, log_level=new.node.log_level), metrics=new.metrics
        )
        if metrics_changed:
            for w in [w for w in self.workers if w.role == "metrics"]:
                self.workers.remove(w)
                if w.proc is not None:
                    w.proc.terminate()
                    try:
                        w.proc.wait(STOP_WAIT)
                    except subprocess.TimeoutExpired:
                        w.proc.kill()
                        w.proc.wait()
            self._add_metrics_worker()  # started by the next _check_children
            self._publish_workers()
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGHUP)

    def _start(self, w: WorkerSpec) -> None:
        """Fork the worker from the zygote (SIGHUP ignored in it until the worker sets
        its handler; only ``w.fds`` besides stdio); a dead zygote is replaced first."""
        try:
            try:
                w.proc = self.zygote.spawn(w.role, w.module, w.argv, w.fds)
            except ZygoteError as exc:
                self.log.warning("zygote.restarted", error=str(exc))
                self.zygote.close()
                self.zygote = Zygote.start()
                w.proc = self.zygote.spawn(w.role, w.module, w.argv, w.fds)
        except (ZygoteError, OSError) as exc:  # tried again after the backoff
            self.log.error("worker.start_failed", worker=w.role, error=str(exc))
            w.next_start = time.monotonic() + w.backoff
            w.backoff = min(w.backoff * 2, RESTART_BACKOFF_MAX)
            return
        w.started_at = time.monotonic()
        self.log.info("worker.start", worker=w.role, pid=w.proc.pid)

    def _check_children(self) -> None:
        now = time.monotonic()
        changed = False
        for w in self.workers:
            if w.proc is not None:
                code = w.proc.poll()
                if code is None:
                    continue
                if now - w.started_at > STABLE_AFTER:
                    w.backoff = 0.5  # it ran stably: forget old failures
                w.proc = None
                w.restarts += 1
                w.next_start = now + w.backoff
                self.log.warning(
                    "worker.exited", worker=w.role, exit_code=code, restart_in_s=w.backoff
                )
                w.backoff = min(w.backoff * 2, RESTART_BACKOFF_MAX)
            elif now >= w.next_start:
                self._start(w)
                if w.proc is None:
                    continue
                if w.restarts:
                    self.log.warning(
                        "worker.restarted", worker=w.role, pid=w.proc.pid, restarts=w.restarts
                    )
                changed = True
        if changed:
            self._publish_workers()
        known = {w.proc.pid for w in self.workers if w.proc is not None}
        reap_strangers(known | {self.zygote.pid})

    def _publish_workers(self) -> None:
        body = {
            "pid": os.getpid(),
            "zygote": {"pid": self.zygote.pid},
            "workers": [
                {"role": w.role, "pid": w.proc.pid if w.proc else None, "restarts": w.restarts}
                for w in self.workers
            ],
        }
        self.to_control.put(msg.packed(msg.REC_SUPERVISOR, body))

    def _control_ready(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.cfg.node.control_socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def run(self) -> int:
        def _stop(_sig: int, _frm: object) -> None:
            self.stopping = True

        def _hup(_sig: int, _frm: object) -> None:
            self.reload_wanted = True

        # Every signal (a worker's SIGCHLD too) writes a byte to `wake`: the loop
        # sleeps in select() until then or until its next deadline, not in a poll.
        wake, wake_in = socket.socketpair()
        wake.setblocking(False)
        wake_in.setblocking(False)
        signal.set_wakeup_fd(wake_in.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGHUP, _hup)
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)
        sid = self.identity.sid
        self.log.info(
            "node.start",
            sid=str(sid),
            ipv6=str(sid.ipv6()),
            name=self.cfg.node.name,
            interfaces=[i.name for i in self.cfg.interfaces],
            interface_workers=self.cfg.workers.per_interface,
            crypto_workers=self.cfg.workers.crypto,
        )
        watchdog = sdnotify.watchdog_interval()
        next_ping = time.monotonic()
        try:
            while not self.stopping:
                if self.reload_wanted:
                    self.reload_wanted = False
                    self._reload()
                self._check_children()
                if not self.ready and self._control_ready():
                    self.ready = True
                    sdnotify.notify("READY=1\nSTATUS=meshpipe node running")
                    self._publish_workers()
                    self.log.info("node.ready", control_socket=self.cfg.node.control_socket)
                if watchdog is not None and time.monotonic() >= next_ping:
                    # Ping only while the control worker lives: a node whose control
                    # plane keeps dying should be restarted by systemd.
                    if self.workers[0].proc is not None:
                        sdnotify.notify("WATCHDOG=1")
                    next_ping = time.monotonic() + watchdog
                if self.stopping or self.reload_wanted:
                    continue
                select.select([wake], [], [], self._sleep_for(watchdog and next_ping))
                _drain(wake)
        finally:
            sdnotify.notify("STOPPING=1")
            signal.set_wakeup_fd(-1)
            self._shutdown()
            wake.close()
            wake_in.close()
        return 0

    def _sleep_for(self, next_ping: float | None) -> float | None:
        """Seconds until the loop has something to do (None: only a signal): the
        control socket's first answer, a worker's restart, the watchdog ping."""
        if not self.ready:
            return POLL
        due = [w.next_start for w in self.workers if w.proc is None]
        if next_ping is not None:
            due.append(next_ping)
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _shutdown(self) -> None:
        control = self.workers[0].proc
        if control is not None:
            control.terminate()
            try:
                control.wait(CONTROL_STOP_WAIT)
            except subprocess.TimeoutExpired:
                pass  # killed with the rest below
        procs = [w.proc for w in self.workers if w.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + STOP_WAIT
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for r in self.rings:
            r.close()
            r.unlink()
        self.zygote.close()
        self.log.info("node.stop")


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass


def _fds(specs: Any) -> list[int]:
    """Every eventfd named in a nest of ring specs (what a worker must inherit)."""
    if isinstance(specs, dict):
        if "eventfd" in specs:
            return [int(specs["eventfd"])]
        return [fd for v in specs.values() for fd in _fds(v)]
    if isinstance(specs, list):
        return [fd for v in specs for fd in _fds(v)]
    return []
