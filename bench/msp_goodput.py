"""Goodput of one reliable MSP stream over 1 and 3 hops, against raw TCP and Reticulum.

Run as root with the repository's venv (see bench/README.md):

    .venv/bin/python -m bench.msp_goodput [--size-mb 50] [--runs 5] [--json]

Four namespaces a - b - c - d (``meshpipe_workers.labnet.Lab``, underlay
198.18.0.0/15) carry, in turn and in the same run:

- tcp: one TCP connection over the raw veths, routed by the kernel (bench/tcp_xfer.py);
- reticulum: one Reticulum instance per namespace with only UDPInterfaces on the veth
  addresses, transport enabled on the inner nodes, RNS.Link + RNS.Resource
  (bench/rns_xfer.py, in its own venv bench/.venv-rns, installed here from PyPI);
- meshpipe: real `meshpipe run` nodes, `meshpipe msp listen` on the receiver and
  `meshpipe msp connect` on the sender.

Every transfer is checked byte-exact (sha256). Goodput is bytes / (time the receiver
got the last byte - time it got the first byte), the median of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

if __package__ in (None, ""):  # run as a script: python bench/msp_goodput.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    REPO,
    BenchError,
    LineReader,
    Row,
    add_common_args,
    exit_on_signals,
    log,
    make_payload,
    mbit_per_s,
    print_table,
    repeat,
    require_root,
    route_line,
    to_json,
)
from meshpipe_workers.labnet import Lab, meshpipe_argv
from meshpipe_workers.netns import Topology, stop_process

NAMES = ["a", "b", "c", "d"]
CASES = {"1 hop": ("a", "b"), "3 hops": ("a", "d")}
SUBJECT = "meshpipe"
REFERENCES = ["tcp", "reticulum"]
SYSTEMS = ["tcp", "reticulum", "meshpipe"]

BENCH = REPO / "bench"
TCP_SCRIPT = BENCH / "tcp_xfer.py"
RNS_SCRIPT = BENCH / "rns_xfer.py"
RNS_VENV = BENCH / ".venv-rns"
RNS_VERSION = "1.5.7"  # pinned so that reference numbers stay comparable between runs
TCP_PORT = 5201
RNS_PORT = 4242
MSP_PORT = 5300
MSP_CONNECT_ATTEMPTS = 3
MSP_UNAVAILABLE = "meshpipe: msp CLI not available"


@dataclass
class Payload:
    path: Path
    size: int
    sha256: str

    @property
    def label(self) -> str:
        return f"{self.size / 1e6:g} MB"


def receiver_addr(topo: Topology, src: str, dst: str) -> str:
    """``dst``'s address on its link towards ``src`` (the link the data arrives on)."""
    i, j = NAMES.index(src), NAMES.index(dst)
    return topo.address_towards(dst, NAMES[j - 1 if j > i else j + 1])


def check(result: dict[str, Any], payload: Payload, what: str) -> float:
    """Goodput in Mbit/s of a receiver's result, after checking it is byte-exact."""
    if result.get("bytes") != payload.size or result.get("sha256") != payload.sha256:
        raise BenchError(
            f"{what}: received {result.get('bytes')} bytes sha256 {result.get('sha256')}, "
            f"sent {payload.size} bytes sha256 {payload.sha256}"
        )
    return mbit_per_s(payload.size, float(result["t_end"]) - float(result["t_first"]))


def transfer_timeout(payload: Payload, floor_mbit: float = 1.0) -> float:
    """Give up on a transfer slower than ``floor_mbit`` Mbit/s (plus set-up slack)."""
    return 60.0 + payload.size * 8 / (floor_mbit * 1e6)


# -- raw TCP ----------------------------------------------------------------------------


def tcp_run(
    topo: Topology, src: str, dst: str, payload: Payload, timeout: float | None = None
) -> float:
    addr = receiver_addr(topo, src, dst)
    timeout = timeout or transfer_timeout(payload)
    py = sys.executable
    recv = topo.exec(
        dst,
        [py, str(TCP_SCRIPT), "recv", addr, str(TCP_PORT), str(payload.size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert recv.stdout is not None
        lines = LineReader(recv.stdout)
        lines.expect("ready", 10, "the TCP receiver")
        send = topo.run(
            src, [py, str(TCP_SCRIPT), "send", addr, str(TCP_PORT), str(payload.path)], timeout
        )
        if send.returncode != 0:
            raise BenchError(f"TCP sender failed: {send.stderr.strip()}")
        return check(lines.next_json(timeout, "the TCP result"), payload, "tcp")
    finally:
        stop_process(recv)


def tcp_case(topo: Topology, src: str, dst: str, payload: Payload, runs: int) -> list[float]:
    return repeat(lambda _i: tcp_run(topo, src, dst, payload), runs, f"tcp {src}->{dst}")


# -- Reticulum --------------------------------------------------------------------------


def ensure_rns() -> Path:
    """bench/.venv-rns with rns installed (from PyPI, once); its python."""
    py = RNS_VENV / "bin" / "python"
    probe = [
        str(py),
        "-c",
        f"import importlib.metadata as m; assert m.version('rns') == '{RNS_VERSION}'",
    ]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    log(f"installing rns=={RNS_VERSION} into {RNS_VENV} ...")
    # Built from the system python, so it shares nothing with the repository's venv.
    base = shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", str(RNS_VENV)], check=True)
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", f"rns=={RNS_VERSION}"], check=True, timeout=600
    )
    return py


def rns_config(topo: Topology, name: str, path_nodes: list[str]) -> str:
    """A Reticulum config with one UDPInterface per veth of ``name`` on the path, nothing else."""
    inner = name not in (path_nodes[0], path_nodes[-1])
    lines = [
        "[reticulum]",
        f"  enable_transport = {'Yes' if inner else 'No'}",
        "  share_instance = No",  # no shared-instance sockets on loopback
        "  discover_interfaces = No",
        "  panic_on_interface_error = Yes",
        "[logging]",
        "  loglevel = 2",
        "[interfaces]",
    ]
    k = path_nodes.index(name)
    for peer in path_nodes[max(k - 1, 0) : k] + path_nodes[k + 1 : k + 2]:
        lines += [
            f"  [[veth to {peer}]]",
            "    type = UDPInterface",
            "    enabled = Yes",
            f"    listen_ip = {topo.address_towards(name, peer)}",
            f"    listen_port = {RNS_PORT}",
            f"    forward_ip = {topo.address_towards(peer, name)}",
            f"    forward_port = {RNS_PORT}",
            # Ingress control throttles announce and path-request bursts on young
            # interfaces, against floods; here it would only delay path discovery.
            "    ingress_control = No",
        ]
    return "\n".join(lines) + "\n"


def rns_case(
    topo: Topology, src: str, dst: str, payload: Payload, runs: int, workdir: Path
) -> list[float]:
    py = str(ensure_rns())
    i, j = NAMES.index(src), NAMES.index(dst)
    path_nodes = NAMES[i : j + 1] if i < j else NAMES[j : i + 1][::-1]
    confdirs: dict[str, Path] = {}
    for name in path_nodes:
        d = workdir / f"rns-{src}{dst}-{name}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "config").write_text(rns_config(topo, name, path_nodes))
        confdirs[name] = d
    procs: list[subprocess.Popen[str]] = []
    timeout = transfer_timeout(payload, floor_mbit=0.05)
    try:
        for name in path_nodes[1:-1]:
            p = topo.exec(
                name,
                [py, str(RNS_SCRIPT), "relay", str(confdirs[name])],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(p)
            assert p.stdout is not None
            LineReader(p.stdout).expect("ready", 30, f"the Reticulum relay on {name}")
        recv = topo.exec(
            dst,
            [py, str(RNS_SCRIPT), "recv", str(confdirs[dst])],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(recv)
        assert recv.stdout is not None
        lines = LineReader(recv.stdout)
        dest = lines.expect("dest ", 30, "the Reticulum receiver's destination").split()[-1]

        send = topo.exec(
            src,
            [py, str(RNS_SCRIPT), "send", str(confdirs[src]), dest],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(send)
        assert send.stdin is not None and send.stdout is not None
        sent = LineReader(send.stdout)
        sent.expect("ready", 90, "the Reticulum sender to find a path")
        sender_in = send.stdin

        def one(_run: int) -> float:
            sender_in.write(f"{payload.path}\n")
            sender_in.flush()
            done = sent.next_json(timeout, "the Reticulum sender")
            if not done.get("ok"):
                raise BenchError(f"Reticulum sender failed: {done}")
            return check(lines.next_json(30, "the Reticulum result"), payload, "reticulum")

        return repeat(one, runs, f"reticulum {src}->{dst}")
    finally:
        for p in procs:
            stop_process(p)


# -- meshpipe ---------------------------------------------------------------------------


def msp_available() -> bool:
    res = subprocess.run([*meshpipe_argv(), "msp", "--help"], capture_output=True, timeout=30)
    return res.returncode == 0


class Sink:
    """Reads a child's stdout into memory, timing the first and the last byte."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.chunks: list[bytes] = []
        self.t_first = 0.0
        self.t_end = 0.0
        self._stream = stream
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        read = self._stream.read1 if hasattr(self._stream, "read1") else self._stream.read
        while chunk := read(1 << 20):
            if not self.chunks:
                self.t_first = time.monotonic()
            self.chunks.append(chunk)
        self.t_end = time.monotonic()

    def started(self) -> bool:
        return bool(self.chunks)

    def result(self, timeout: float) -> dict[str, Any]:
        self._t.join(timeout)
        if self._t.is_alive():
            raise BenchError(f"meshpipe listener still receiving after {timeout:.0f} s")
        h = hashlib.sha256()
        for c in self.chunks:
            h.update(c)
        got = sum(len(c) for c in self.chunks)
        return {"bytes": got, "sha256": h.hexdigest(), "t_first": self.t_first, "t_end": self.t_end}


def _tail(path: Path, n: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def msp_run(
    lab: Lab, src: str, dst: str, payload: Payload, port: int, timeout: float | None = None
) -> float:
    assert lab.topo is not None
    timeout = timeout or transfer_timeout(payload)
    env = {**os.environ, "MESHPIPE_CONFIG": str(lab.nodes[dst].config)}
    # stderr to a file: a chatty child must never block on a full pipe nobody reads.
    listen_log = lab.nodes[dst].dir / f"msp-listen-{port}.log"
    with listen_log.open("wb") as errf:
        listen = lab.topo.exec(
            dst,
            [*meshpipe_argv(), "msp", "listen", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errf,
            env=env,
        )
    try:
        assert listen.stdout is not None
        sink = Sink(listen.stdout)
        env["MESHPIPE_CONFIG"] = str(lab.nodes[src].config)
        argv = [*meshpipe_argv(), "msp", "connect", lab.nodes[dst].sid, str(port)]
        for attempt in range(MSP_CONNECT_ATTEMPTS):
            # The CLI has no readiness signal: give the listener time to take the port,
            # and retry a connect that failed before any byte arrived.
            time.sleep(1.0)
            if listen.poll() is not None:
                raise BenchError(f"msp listen exited early: {_tail(listen_log)}")
            with payload.path.open("rb") as f:
                conn = lab.topo.run(
                    src,
                    argv,
                    timeout,
                    stdin=f,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=env,
                )
            if conn.returncode == 0:
                break
            if sink.started() or attempt == MSP_CONNECT_ATTEMPTS - 1:
                raise BenchError(f"msp connect exited {conn.returncode}: {conn.stderr.strip()}")
        result = sink.result(timeout)
        if listen.wait(30) != 0:
            raise BenchError(f"msp listen exited {listen.returncode}: {_tail(listen_log)}")
        return check(result, payload, "meshpipe")
    finally:
        stop_process(listen)


def meshpipe_case(lab: Lab, src: str, dst: str, payload: Payload, runs: int) -> list[float]:
    hops = abs(NAMES.index(dst) - NAMES.index(src))
    lab.wait_for(
        lambda: (r := lab.route(src, dst)) is not None and r["hops"] == hops,
        60,
        f"a {hops}-hop route {src}->{dst}",
    )
    # One ping first, so the end-to-end session exists before timing (as TCP's handshake
    # and Reticulum's link set-up are outside their timings too).
    lab.cli(src, "ping", lab.nodes[dst].sid, "--count", "1")
    return repeat(
        lambda i: msp_run(lab, src, dst, payload, MSP_PORT + i), runs, f"meshpipe {src}->{dst}"
    )


# -- driver -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.msp_goodput", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--size-mb", type=float, default=50.0, help="file size for TCP and meshpipe")
    p.add_argument(
        "--rns-size-mb",
        type=float,
        default=None,
        help="file size for Reticulum (default: --size-mb); goodput is size/time either way",
    )
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)}",
    )
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    if unknown := set(args.systems) - set(SYSTEMS):
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def measure(
    rows: list[Row], case: str, system: str, note: str, fn: Callable[[], list[float]]
) -> None:
    """Run ``fn()`` -> samples into a new row; a failure becomes the row's error, not a crash."""
    row = Row(case=case, system=system, note=note)
    rows.append(row)
    try:
        row.samples = fn()
    except BenchError as e:
        row.error = str(e)
        log(f"  {system} {case}: FAILED: {e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_root()
    if "reticulum" in args.systems:
        ensure_rns()  # before any namespace exists: the install may take a while
    workdir = Path(tempfile.mkdtemp(prefix="meshpipe-bench-"))
    rows: list[Row] = []
    try:
        main_p = Payload(workdir / "payload.bin", int(args.size_mb * 1e6), "")
        main_p.sha256 = make_payload(main_p.path, main_p.size)
        rns_p = main_p
        rns_note = ""
        if args.rns_size_mb is not None and int(args.rns_size_mb * 1e6) != main_p.size:
            rns_p = Payload(workdir / "payload-rns.bin", int(args.rns_size_mb * 1e6), "")
            rns_p.sha256 = make_payload(rns_p.path, rns_p.size)
            rns_note = f"moved {rns_p.label} per run instead of {main_p.label}"
        with exit_on_signals(), Lab(NAMES, workdir / "lab", netns=True) as lab:
            topo = lab.topo
            assert topo is not None
            route_line(topo)
            for case, (src, dst) in CASES.items():
                if "tcp" in args.systems:
                    log(f"tcp {case} ({main_p.label})")
                    fn = partial(tcp_case, topo, src, dst, main_p, args.runs)
                    measure(rows, case, "tcp", "", fn)
                if "reticulum" in args.systems:
                    log(f"reticulum {case} ({rns_p.label})")
                    fn = partial(rns_case, topo, src, dst, rns_p, args.runs, workdir)
                    measure(rows, case, "reticulum", rns_note, fn)
            if "meshpipe" in args.systems:
                available = msp_available()
                if available:
                    lab.start_all()
                for case, (src, dst) in CASES.items():
                    if not available:
                        rows.append(Row(case=case, system="meshpipe", error=MSP_UNAVAILABLE))
                        log(MSP_UNAVAILABLE)
                        continue
                    log(f"meshpipe {case} ({main_p.label})")
                    fn = partial(meshpipe_case, lab, src, dst, main_p, args.runs)
                    measure(rows, case, "meshpipe", "", fn)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {
        "runs": args.runs,
        "size_bytes": main_p.size,
        "rns_size_bytes": rns_p.size,
        "rns_version": RNS_VERSION,
        "goodput": "bytes / (last byte - first byte at the receiver)",
    }
    if args.json:
        print(to_json(rows, SUBJECT, REFERENCES, **meta))
    else:
        print(
            f"MSP goodput, median of {args.runs} runs (Mbit/s, [min-max]); "
            "every transfer sha256-checked"
        )
        print_table(rows, SUBJECT, REFERENCES)
    return 0 if all(not r.error or r.error == MSP_UNAVAILABLE for r in rows) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # The with-blocks have already stopped every process and removed the namespaces.
        log("interrupted")
        sys.exit(130)
