"""A 200 KB reliable MSP transfer a -udp- b -radio- c over a simulated 19,200 bit/s radio.

No root needed (loopback UDP and pseudo-terminals only):

    .venv/bin/python -m bench.radio_xfer [--runs 3] [--size-kb 200] [--rate 19200] [--json]

``a`` and ``b`` share a loopback UDP link; ``b`` and ``c`` share one radio channel
(``meshpipe_workers.radio_channel.RadioChannel``: CSMA with random backoff, so the
data and the ACKs flowing the other way can collide). ``meshpipe msp connect`` on
``a`` sends a random file to ``meshpipe msp listen`` on ``c``; the time runs from
the connect to the listener's exit, and the bytes must arrive exact (sha256).

Printed: the median over ``--runs`` of the time, the payload goodput (10 bits a byte,
as the serial line counts them) against the line rate, and what the air carried
(bytes by frame kind, collisions). Each run takes 2-3 minutes at 19,200 bit/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/radio_xfer.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BenchError, log
from meshpipe_workers.labnet import Lab
from meshpipe_workers.radio_channel import RadioChannel, radio_interface_toml

RATE = 19_200
SIZE = 200 * 1000
PORT = 5100
STALL = 45.0  # seconds without a new byte at the reader: the stream is stuck
# How long a lab's radio routes may take to come up: nodes start together, and a
# link-up route dump lost in a collision waits for the next dump (90 s on a radio).
ROUTES_UP = 120.0


@dataclass
class Mesh:
    lab: Lab
    air: RadioChannel


@dataclass
class Xfer:
    seconds: float
    goodput_bps: float  # payload bits (10 a byte) per second
    line_share: float  # goodput / line rate
    air: dict[str, int]  # the channel's counters over the transfer


@contextmanager
def radio_mesh(work: Path, rate: int = RATE, base_port: int | None = None) -> Iterator[Mesh]:
    """a -udp(loopback)- b -radio- c, up and routed."""
    port = base_port or 24000 + os.getpid() % 20000
    with RadioChannel(["b", "c"], rate) as air:
        lab = Lab(
            ["a", "b", "c"],
            work,
            netns=False,
            base_port=port,
            udp_nodes=["a", "b"],
            node_config={n: radio_interface_toml(air.path(n), rate) for n in "bc"},
        )
        with lab:
            for name in lab.names:
                lab.start(name, wait=False)
            lab.wait_for(
                lambda: (r := lab.route("a", "c")) and r["hops"] == 2 and lab.route("c", "a"),
                ROUTES_UP,
                "a's route to c over udp + radio",
            )
            yield Mesh(lab, air)


def transfer(mesh: Mesh, tmp: Path, port: int, size: int = SIZE, upstream: bool = False) -> Xfer:
    """Move ``size`` bytes between ``msp connect`` on a and ``msp listen`` on c: a -> c, or
    c -> a when ``upstream`` (the listener writes). Raises BenchError when the bytes
    stall or arrive damaged."""
    lab = mesh.lab
    src, dst = tmp / "src.bin", tmp / "dst.bin"
    src.write_bytes(os.urandom(size))
    into, out_of = (src.open("rb"), dst.open("wb"))
    writer_io = {"stdin": into, "stdout": subprocess.DEVNULL}
    reader_io = {"stdin": subprocess.DEVNULL, "stdout": out_of}
    c_io, a_io = (writer_io, reader_io) if upstream else (reader_io, writer_io)
    listener = lab.popen("c", "msp", "listen", str(port), stderr=subprocess.PIPE, **c_io)
    lab.wait_for(
        lambda: any(s["port"] == port for s in lab.cli("c", "status")["listening"]),
        10,
        "the listener on c",
    )
    air0 = mesh.air.stats()
    t0 = time.monotonic()
    c_sid = lab.nodes["c"].sid[:16]
    sender = lab.popen("a", "msp", "connect", c_sid, str(port), stderr=subprocess.PIPE, **a_io)
    try:
        got, moved_at = 0, t0
        while (sender.poll() is None or listener.poll() is None) and got < size:
            time.sleep(0.5)
            if dst.stat().st_size > got:
                got, moved_at = dst.stat().st_size, time.monotonic()
            if time.monotonic() - moved_at > STALL:
                msp = {
                    n: {k: v for k, v in lab.cli(n, "status")["counters"].items() if "msp" in k}
                    for n in ("a", "c")
                }
                workers = [w["counters"] for w in lab.cli("b", "status")["workers"]]
                raise BenchError(
                    f"stalled at {got} of {size} bytes after {time.monotonic() - t0:.0f} s; "
                    f"msp {msp}; b workers {workers}"
                )
        for proc in (sender, listener):
            if proc.wait(60) != 0:
                err = proc.stderr.read() if proc.stderr else b""
                raise BenchError(f"msp exited {proc.returncode}: {err[-500:]!r}")
    finally:
        for proc in (sender, listener):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        into.close()
        out_of.close()
    took = time.monotonic() - t0
    air1 = mesh.air.stats()
    data = dst.read_bytes()
    if hashlib.sha256(data).digest() != hashlib.sha256(src.read_bytes()).digest():
        raise BenchError(f"received {len(data)} bytes that differ from the {size} sent")
    goodput = size * 10 / took
    air = {k: v - air0.get(k, 0) for k, v in air1.items() if v != air0.get(k, 0)}
    return Xfer(took, goodput, goodput / mesh.air.rate_bps, air)


def describe(x: Xfer, size: int, rate: int) -> str:
    kinds = {k[len("air.bytes.") :]: v for k, v in x.air.items() if k.startswith("air.bytes.")}
    return (
        f"{size // 1000} KB a -> c over udp + radio: {x.seconds:.1f} s, goodput "
        f"{x.goodput_bps:.0f} bit/s ({x.line_share:.0%} of {rate} bit/s); air "
        f"{x.air.get('air.bytes', 0)} bytes in {x.air.get('air.frames', 0)} frames "
        f"({size / max(1, x.air.get('air.bytes', 0)):.0%} payload), by kind {kinds}, "
        f"collided {x.air.get('collided', 0)}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.radio_xfer", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size-kb", type=int, default=SIZE // 1000)
    p.add_argument("--rate", type=int, default=RATE)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    size = a.size_kb * 1000
    runs: list[Xfer] = []
    with (
        tempfile.TemporaryDirectory(prefix="radio-xfer-") as tmp,
        radio_mesh(Path(tmp) / "lab", a.rate) as mesh,
    ):
        for i in range(a.runs):
            run_dir = Path(tmp) / f"run{i}"
            run_dir.mkdir()
            x = transfer(mesh, run_dir, PORT + i, size)
            log(f"  run {i + 1}/{a.runs}: {describe(x, size, a.rate)}")
            runs.append(x)
    med = statistics.median(x.line_share for x in runs)
    secs = statistics.median(x.seconds for x in runs)
    if a.json:
        print(json.dumps({"size": size, "rate": a.rate, "runs": [asdict(x) for x in runs]}))
    else:
        print(
            f"{size // 1000} KB a -udp- b -radio- c at {a.rate} bit/s, median of {a.runs}: "
            f"{secs:.1f} s, goodput {med:.0%} of the line rate "
            f"[{min(x.line_share for x in runs):.0%}-{max(x.line_share for x in runs):.0%}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
