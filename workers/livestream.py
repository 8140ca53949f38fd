"""A constant-rate live stream through real nodes, measured (end-to-end tests, demo).

The sender writes one 160-byte record every 20 ms (64 kbit/s, like 20 ms frames of
G.711 audio) into ``meshpipe msp connect`` on one node; ``meshpipe msp listen
--gap-fill zero`` on another writes what arrives to a pipe read here. Each record
carries its send time (wall clock: the namespaces share the host's clock) and its
number, so the lateness of every record that arrived whole is known, and the zeros
written for the gaps keep every record at its own offset.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from meshpipe_workers.labnet import Lab

RECORD = 160
INTERVAL = 0.02
_HEAD = struct.Struct("!dI")  # send time (wall clock), record number


def record(n: int) -> bytes:
    return _HEAD.pack(time.time(), n) + padding(n)


def padding(n: int) -> bytes:
    return bytes([0xA0 | (n & 0x0F)]) * (RECORD - _HEAD.size)


@dataclass
class Received:
    data: bytearray = field(default_factory=bytearray)
    arrivals: list[tuple[int, float]] = field(default_factory=list)  # (end offset, time)

    def arrival(self, offset: int) -> float:
        for end, t in self.arrivals:
            if end >= offset:
                return t
        return float("inf")


@dataclass
class StreamRun:
    """What the listener got from one run."""

    got: Received
    gaps: list[dict[str, Any]]  # the listener's stream.gap lines
    count: int  # records sent

    @property
    def total(self) -> int:
        return self.count * RECORD

    @property
    def delivered(self) -> float:
        lost = sum(int(g["end"]) - int(g["start"]) for g in self.gaps)
        return 1 - lost / self.total

    def lateness(self) -> list[float]:
        """Seconds from send to delivery of every record no gap touched; raises
        AssertionError for a record damaged outside every reported gap."""
        holes = [(g["start"], g["end"]) for g in self.gaps]
        late: list[float] = []
        for n in range(self.count):
            lo, hi = n * RECORD, (n + 1) * RECORD
            if any(s < hi and e > lo for s, e in holes):
                continue
            rec = bytes(self.got.data[lo:hi])
            if len(rec) < RECORD:
                raise AssertionError(f"record {n} missing and no gap reported")
            sent, number = _HEAD.unpack_from(rec)
            sent = float(sent)
            if number != n or rec[_HEAD.size :] != padding(n):
                raise AssertionError(f"record {n} damaged outside any reported gap")
            late.append(self.got.arrival(hi) - sent)
        return late

    def summary(self) -> str:
        late = sorted(self.lateness())

        def pct(p: float) -> float:
            return late[min(len(late) - 1, int(p * len(late)))] * 1000

        return (
            f"delivered {100 * self.delivered:.1f}% of {self.total} bytes, {len(self.gaps)} gaps; "
            f"lateness p50 {pct(0.5):.0f} ms, p99 {pct(0.99):.0f} ms, max {late[-1] * 1000:.0f} ms"
        )


def _reader(fd: int, into: Received) -> None:
    while chunk := os.read(fd, 65536):
        into.data += chunk
        into.arrivals.append((len(into.data), time.time()))


def stream(
    lab: Lab, src: str, dst: str, port: int, connect_args: list[str], seconds: float
) -> StreamRun:
    """``seconds`` of records from ``src`` to ``dst`` on MSP port ``port``."""
    listener = lab.popen(
        dst,
        "msp",
        "listen",
        str(port),
        "--gap-fill",
        "zero",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lab.wait_for(
        lambda: any(s["port"] == port for s in lab.cli(dst, "status")["listening"]),
        10,
        "the listener",
    )
    got = Received()
    assert listener.stdout is not None and listener.stderr is not None
    reader = threading.Thread(target=_reader, args=(listener.stdout.fileno(), got), daemon=True)
    reader.start()
    argv = ["msp", "connect", "-v", *connect_args, lab.nodes[dst].sid[:16], str(port)]
    sender = lab.popen(
        src, *argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert sender.stdin is not None and sender.stderr is not None
    # The budget runs from when the node takes the bytes: start once the stream is open.
    first = sender.stderr.readline()
    if not first.startswith(b"connected "):
        raise RuntimeError(f"msp connect failed: {first.decode(errors='replace').strip()}")
    count = int(seconds / INTERVAL)
    start = time.monotonic()
    for n in range(count):
        delay = start + n * INTERVAL - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sender.stdin.write(record(n))
        sender.stdin.flush()
    sender.stdin.close()
    if sender.wait(60) != 0:
        raise RuntimeError(f"msp connect: {sender.stderr.read().decode(errors='replace')}")
    if listener.wait(60) != 0:
        raise RuntimeError(f"msp listen: {listener.stderr.read().decode(errors='replace')}")
    reader.join(10)
    lines = listener.stderr.read().decode().splitlines()
    gaps = [json.loads(line) for line in lines if line.startswith("{")]
    return StreamRun(got, gaps, count)


__all__ = ["INTERVAL", "RECORD", "Received", "StreamRun", "record", "stream"]
