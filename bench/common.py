"""Shared helpers for the benchmarks in bench/ (run by hand as root; not tests).

- :func:`add_common_args`, :func:`repeat`: every measurement is taken ``--runs``
  times (default 5) and reported as the median, because machines are shared and
  noisy.
- :class:`Row`, :func:`print_table`, :func:`to_json`: a table of medians with
  ratios of a subject to named references, or the same as JSON (``--json``).
- :func:`routed_line`, :func:`route_line`: a line of network namespaces from
  ``meshpipe_workers.netns.line_topology`` (underlay 198.18.0.0/15 only) with
  static routes and IPv4 forwarding in the intermediate namespaces, so that plain
  TCP crosses several hops; everything is torn down on exit, Ctrl-C and SIGTERM.
- :class:`LineReader`: read a child's output lines with a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import queue
import signal
import statistics
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from meshpipe.errors import MeshpipeError
from meshpipe_workers.netns import Topology, line_topology

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = 5


class BenchError(MeshpipeError):
    """A benchmark run failed (a transfer was not byte-exact, a peer never came up, ...)."""


# -- arguments, repetition, units -------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help="repetitions; the median is reported"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON instead of a table"
    )


def require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("this benchmark builds network namespaces: run it as root")


def log(msg: str) -> None:
    """Progress goes to stderr so that ``--json`` output on stdout stays clean."""
    print(msg, file=sys.stderr, flush=True)


def mbit_per_s(nbytes: int, seconds: float) -> float:
    if seconds <= 0:
        raise BenchError(f"non-positive transfer time {seconds!r}")
    return nbytes * 8 / seconds / 1e6


def repeat(fn: Callable[[int], float], runs: int, what: str) -> list[float]:
    """Call ``fn(run_index)`` ``runs`` times; the list of samples, logged as they come."""
    samples: list[float] = []
    for i in range(runs):
        value = fn(i)
        samples.append(value)
        log(f"  {what}: run {i + 1}/{runs}: {value:.2f}")
    return samples


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_payload(path: Path, nbytes: int) -> str:
    """Write ``nbytes`` of random (incompressible) data to ``path``; its sha256."""
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = nbytes
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


# -- processes --------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (a node's supervisor, zygote and workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


# -- results ----------------------------------------------------------------------------


@dataclass
class Row:
    """One system on one case: its samples, or why there are none."""

    case: str  # e.g. "1 hop"
    system: str  # e.g. "tcp"
    samples: list[float] = field(default_factory=list)
    unit: str = "Mbit/s"
    note: str = ""  # e.g. a smaller transfer size
    error: str = ""  # set when the system could not be measured

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples and not self.error else None


def _ratio(num: Row | None, den: Row | None) -> float | None:
    if num is None or den is None or num.median is None or not den.median:
        return None
    return num.median / den.median


def ratios(rows: Sequence[Row], subject: str, references: Sequence[str]) -> dict[str, Any]:
    """``{case: {"subject/ref": ratio or None}}`` from the rows' medians."""
    by = {(r.case, r.system): r for r in rows}
    cases = list(dict.fromkeys(r.case for r in rows))
    return {
        c: {
            f"{subject}/{ref}": _ratio(by.get((c, subject)), by.get((c, ref))) for ref in references
        }
        for c in cases
    }


def to_json(rows: Sequence[Row], subject: str, references: Sequence[str], **meta: Any) -> str:
    out = {
        **meta,
        "results": [
            {
                "case": r.case,
                "system": r.system,
                "unit": r.unit,
                "median": r.median,
                "samples": r.samples,
                "note": r.note,
                "error": r.error,
            }
            for r in rows
        ],
        "ratios": ratios(rows, subject, references),
    }
    return json.dumps(out, indent=2)


def print_table(
    rows: Sequence[Row],
    subject: str,
    references: Sequence[str],
    out: IO[str] | None = None,
) -> None:
    """One line per case: each system's median (min-max), then subject/reference ratios."""
    out = out or sys.stdout
    systems = list(dict.fromkeys(r.system for r in rows))
    by = {(r.case, r.system): r for r in rows}
    rat = ratios(rows, subject, references)
    unit = rows[0].unit if rows else ""
    head = ["case"] + [f"{s} ({unit})" for s in systems] + list(next(iter(rat.values()), {}))
    table: list[list[str]] = [head]
    for case, case_ratios in rat.items():
        line = [case]
        for s in systems:
            r = by.get((case, s))
            if r is None:
                line.append("-")
            elif r.median is None:
                line.append("n/a")
            else:
                line.append(f"{r.median:.1f} [{min(r.samples):.1f}-{max(r.samples):.1f}]")
        line += ["n/a" if v is None else f"{v:.3f}" for v in case_ratios.values()]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        cells = (cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip(), file=out)
    notes = [f"{r.system}, {r.case}: {r.error or r.note}" for r in rows if r.error or r.note]
    for n in dict.fromkeys(notes):
        print(f"  note: {n}", file=out)


# -- namespaces -------------------------------------------------------------------------


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit so ``with`` blocks tear down (Ctrl-C already
    raises KeyboardInterrupt)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _sysctl(topo: Topology, name: str, setting: str) -> None:
    res = topo.run(name, ["sysctl", "-q", "-w", setting], timeout=10)
    if res.returncode != 0:
        raise BenchError(f"sysctl {setting} in {topo.ns(name)}: {res.stderr.strip()}")


def route_line(topo: Topology) -> None:
    """Static routes along a line topology and forwarding in its inner nodes.

    Subnets left of a node are reached through its left neighbour, those right of it
    through its right neighbour. Only the 198.18.0.0/15 subnets of ``topo`` appear.
    """
    names = topo.names
    for k, name in enumerate(names):
        if 0 < k < len(names) - 1:
            _sysctl(topo, name, "net.ipv4.ip_forward=1")
        for j, link in enumerate(topo.links):  # link j joins names[j] and names[j + 1]
            if j in (k - 1, k):
                continue  # directly attached
            hop = names[k - 1] if j < k else names[k + 1]
            via = topo.address_towards(hop, name)
            subnet = str(ipaddress.ip_interface(link.left_addr).network)
            res = topo.run(name, ["ip", "route", "replace", subnet, "via", via], timeout=10)
            if res.returncode != 0:
                raise BenchError(f"route in {topo.ns(name)}: {res.stderr.strip()}")


@contextlib.contextmanager
def routed_line(names: list[str], prefix: str | None = None) -> Iterator[Topology]:
    """``line_topology(names)`` with :func:`route_line` applied; always torn down."""
    with exit_on_signals(), line_topology(names, prefix) as topo:
        route_line(topo)
        yield topo


# -- child output -----------------------------------------------------------------------


class LineReader:
    """Lines of a child's text stream, read by a daemon thread, taken with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._q: queue.Queue[str | None] = queue.Queue()
        self._t = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._t.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._q.put(line.rstrip("\n"))
        finally:
            self._q.put(None)

    def next(self, timeout: float, what: str) -> str:
        """The next line; BenchError on EOF or when none comes within ``timeout`` s."""
        try:
            line = self._q.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}") from None
        if line is None:
            self._q.put(None)  # stay at EOF for later callers
            raise BenchError(f"output ended while waiting for {what}")
        return line

    def expect(self, prefix: str, timeout: float, what: str) -> str:
        """The next line starting with ``prefix`` (other lines, e.g. logs, are skipped)."""
        while True:
            line = self.next(timeout, what)
            if line.startswith(prefix):
                return line

    def next_json(self, timeout: float, what: str) -> dict[str, Any]:
        """The next line that parses as a JSON object (other lines are skipped)."""
        while True:
            line = self.next(timeout, what)
            try:
                val = json.loads(line)
            except ValueError:
                continue
            if isinstance(val, dict):
                return val
