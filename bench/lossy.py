"""One MSP stream against kernel TCP over 3 hops with kernel loss on every link.

Run as root with the repository's venv (see bench/README.md):

    .venv/bin/python -m bench.lossy [--size-mib 2] [--runs 3] [--batch-loss 10]
                                    [--frame-loss 1,5,10,20] [--hop-recovery auto,off]
                                    [--timeout 300] [--json]

Four namespaces a - b - c - d (``meshpipe_workers.labnet.Lab``, underlay
198.18.0.0/15, static routes and forwarding for TCP); every node drops the given
percentage of what it sends on each of its links (nftables ``numgen random``,
``Topology.set_loss``, direction "out": each link direction loses that much once).

- per batch: the default config. nftables sees a UDP GSO batch (meshpipe) or a TCP
  TSO/GSO segment (the kernel) as one packet, so a drop takes a run of frames: a burst.
- per frame: ``[workers] udp_offload = false`` in the nodes and GSO/TSO/GRO off on
  the veths (``Topology.disable_offloads``), so every frame is drawn on its own.

Each case alternates TCP (bench/tcp_xfer.py) and MSP (``meshpipe msp listen`` /
``meshpipe msp connect``, after a ``meshpipe ping`` made on a clean path, so the
session exists) ``--runs`` times. The time is the receiver's first to last byte
(set-up left out for both alike); every transfer is checked byte-exact. A transfer
that does not finish within ``--timeout`` counts as that long (printed as ">T").
The ratio is TCP's median time over MSP's: above 1, MSP is faster. With
``--hop-recovery`` listing several modes, every loss group runs once per mode (the
nodes restarted with ``[[interface]] hop_recovery = <mode>``; TCP is unaffected).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/lossy.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BenchError, exit_on_signals, log, make_payload, require_root, route_line
from bench.msp_goodput import MSP_PORT, NAMES, Payload, msp_run, tcp_run
from meshpipe_workers.labnet import Lab

SRC, DST = "a", "d"
NO_OFFLOAD = "[workers]\nudp_offload = false\n"


@dataclass
class Case:
    """One loss setting: TCP's and MSP's times (seconds; the timeout for a failure)."""

    name: str
    loss: float
    per_frame: bool
    tcp: list[float] = field(default_factory=list)
    msp: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def ratio(self) -> float | None:
        if not self.tcp or not self.msp:
            return None
        return statistics.median(self.tcp) / statistics.median(self.msp)


def _seconds_of(payload: Payload, goodput: Callable[[], float]) -> float:
    """A transfer's time from its goodput in Mbit/s (first to last byte)."""
    return payload.size * 8 / (goodput() * 1e6)


def _timed(case: Case, system: str, timeout: float, fn: Callable[[], float]) -> float:
    """Run one transfer; a failure or timeout counts as ``timeout`` and is noted."""
    try:
        return fn()
    except (BenchError, OSError, TimeoutError) as e:
        case.failures.append(f"{system}: {e}")
        log(f"  {system} {case.name}: FAILED: {e}")
        return timeout
    except Exception as e:  # subprocess.TimeoutExpired and the like
        case.failures.append(f"{system}: {type(e).__name__}: {e}")
        log(f"  {system} {case.name}: FAILED: {type(e).__name__}: {e}")
        return timeout


def _set_loss(lab: Lab, percent: float) -> None:
    assert lab.topo is not None
    for name in NAMES:
        lab.topo.set_loss(name, percent, directions=["out"])


def run_cases(
    lab: Lab, cases: list[Case], payload: Payload, runs: int, timeout: float, port: int
) -> int:
    """Measure ``cases`` on a started lab; returns the next free MSP port."""
    assert lab.topo is not None
    hops = len(NAMES) - 1
    for case in cases:
        log(f"{case.name}: {payload.size} bytes, {runs} runs each")
        lab.topo.clear_loss()
        lab.wait_for(
            lambda: (r := lab.route(SRC, DST)) is not None and r["hops"] == hops,
            60,
            f"a {hops}-hop route {SRC}->{DST}",
        )
        lab.cli(SRC, "ping", lab.nodes[DST].sid, "--count", "1")  # the session, unhurried
        _set_loss(lab, case.loss)
        for i in range(runs):
            tcp = partial(tcp_run, lab.topo, SRC, DST, payload, timeout)
            t = _timed(case, "tcp", timeout, partial(_seconds_of, payload, tcp))
            case.tcp.append(t)
            log(f"  tcp run {i + 1}/{runs}: {t:.2f} s")
            msp = partial(msp_run, lab, SRC, DST, payload, port, timeout)
            port += 1
            t = _timed(case, "meshpipe", timeout, partial(_seconds_of, payload, msp))
            case.msp.append(t)
            log(f"  meshpipe run {i + 1}/{runs}: {t:.2f} s")
        lab.topo.clear_loss()
    return port


def _fmt(samples: list[float], timeout: float) -> str:
    if not samples:
        return "n/a"
    med = statistics.median(samples)
    cell = f">{timeout:.0f}" if med >= timeout else f"{med:.2f}"
    return f"{cell} [{min(samples):.2f}-{max(samples):.2f}]"


def print_results(cases: list[Case], runs: int, timeout: float) -> None:
    print(f"2 hops of forwarding (a-b-c-d), median of {runs} runs, seconds [min-max]")
    head = ["loss per link and direction", "kernel TCP", "MSP", "TCP time / MSP time"]
    table = [head]
    for c in cases:
        r = c.ratio()
        table.append(
            [
                c.name,
                _fmt(c.tcp, timeout),
                _fmt(c.msp, timeout),
                "n/a" if r is None else f"{r:.2f}x",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for c in cases:
        for f in dict.fromkeys(c.failures):
            print(f"  note: {c.name}: {f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.lossy", description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=float, default=2.0, help="bytes moved per run, in MiB")
    p.add_argument("--runs", type=int, default=3, help="repetitions; the median is reported")
    p.add_argument(
        "--batch-loss", default="10", help="comma-separated percents, default config ('' skips)"
    )
    p.add_argument(
        "--frame-loss",
        default="1,5,10,20",
        help="comma-separated percents, offloads off ('' skips)",
    )
    p.add_argument(
        "--hop-recovery",
        default="auto",
        help="comma-separated [[interface]] hop_recovery modes (auto, on, off), one run each",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per transfer")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    try:
        args.batch_loss = [float(x) for x in args.batch_loss.split(",") if x.strip()]
        args.frame_loss = [float(x) for x in args.frame_loss.split(",") if x.strip()]
    except ValueError:
        p.error("loss levels are comma-separated numbers (percent)")
    if any(not 0 <= x <= 100 for x in args.batch_loss + args.frame_loss):
        p.error("loss levels are percents within 0..100")
    args.hop_recovery = [m.strip() for m in args.hop_recovery.split(",") if m.strip()]
    if not args.hop_recovery or any(m not in ("auto", "on", "off") for m in args.hop_recovery):
        p.error("--hop-recovery modes are auto, on and off")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_root()
    workdir = Path(tempfile.mkdtemp(prefix="meshpipe-lossy-"))
    cases: list[Case] = []
    try:
        payload = Payload(workdir / "payload.bin", int(args.size_mib * 1024 * 1024), "")
        payload.sha256 = make_payload(payload.path, payload.size)
        port = MSP_PORT
        for mode in args.hop_recovery:
            tag = "" if args.hop_recovery == ["auto"] else f", recovery {mode}"
            groups = [
                ([Case(f"{x:g}% per batch{tag}", x, False) for x in args.batch_loss], ""),
                ([Case(f"{x:g}% per frame{tag}", x, True) for x in args.frame_loss], NO_OFFLOAD),
            ]
            for group, extra in groups:
                if not group:
                    continue
                with (
                    exit_on_signals(),
                    Lab(NAMES, workdir / "lab", netns=True, extra_config=extra) as lab,
                ):
                    assert lab.topo is not None
                    route_line(lab.topo)
                    if extra:
                        lab.topo.disable_offloads()
                    lab.set_interface_key("hop_recovery", f'"{mode}"')
                    lab.start_all()
                    port = run_cases(lab, group, payload, args.runs, args.timeout, port)
                cases += group
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        out = {
            "runs": args.runs,
            "size_bytes": int(args.size_mib * 1024 * 1024),
            "timeout": args.timeout,
            "time": "seconds, receiver's first to last byte",
            "cases": [
                {
                    "case": c.name,
                    "tcp": c.tcp,
                    "msp": c.msp,
                    "tcp_median": statistics.median(c.tcp) if c.tcp else None,
                    "msp_median": statistics.median(c.msp) if c.msp else None,
                    "tcp_over_msp": c.ratio(),
                    "failures": c.failures,
                }
                for c in cases
            ],
        }
        print(json.dumps(out, indent=2))
    else:
        print_results(cases, args.runs, args.timeout)
    return 0 if not any(c.failures for c in cases) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
