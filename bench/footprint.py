"""Idle footprint: PSS/USS per process and in total, idle CPU and wake-ups a second.

Run as root (it builds its own namespaces a - b, underlay 198.18.0.0/15):

    flock -x /tmp/meshpipe-heavy.lock .venv/bin/python bench/footprint.py

- meshpipe: two real ``meshpipe run`` nodes with ``[tunnel]`` on and the default
  timers (as ``meshpipe init --tunnel``), one the other's only neighbour, once per
  crypto worker count in ``--crypto`` (default 1,2,4); node b is measured
  ``--settle`` seconds after its route to a exists (issue 13 measured 15 s after start).
- wireguard-go (Debian package, installed when missing) and yggdrasil 0.4.7 (the
  Debian package, only unpacked into the work directory: installing it would start
  its service on the host), each with one peer across the same veth, yggdrasil's
  200::/7 addresses only on its TUN inside the bench's namespaces.

Per process: PSS and USS from /proc/PID/smaps_rollup, CPU time and wake-ups (times
scheduled in), both summed over threads from /proc/PID/task/*/schedstat,
over ``--idle`` seconds cut into ``--runs`` windows; the median window is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/footprint.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BenchError, exit_on_signals, log, process_tree, require_root
from bench.tunnel import PAIR, ensure_packages, set_tunnel_config, wireguard
from meshpipe.config import TimingSection
from meshpipe_workers.labnet import Lab
from meshpipe_workers.metrics import read_rollup, uss_of
from meshpipe_workers.netns import Topology, stop_process

YGG_PORT = 19001
MB = 1 << 20


@dataclass
class Proc:
    pid: int
    name: str
    pss: int
    uss: int
    cpu_pct: float
    wakeups: float  # a second


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _schedstat(pid: int) -> tuple[float, int]:
    """CPU seconds (nanosecond resolution, unlike /proc/PID/stat's ticks) and times
    scheduled in, summed over the process's threads (/proc/PID/task/*/schedstat)."""
    cpu, n = 0, 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0
    for t in tasks:
        try:
            fields = Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()
            cpu += int(fields[0])
            n += int(fields[2])
        except (OSError, IndexError, ValueError):
            continue
    return cpu / 1e9, n


def measure(pids: list[int], idle: float, windows: int) -> list[Proc]:
    """Memory now, then CPU and wake-ups per window; each process's median window."""
    cpu: dict[int, list[float]] = {p: [] for p in pids}
    wake: dict[int, list[float]] = {p: [] for p in pids}
    span = idle / windows
    for _ in range(windows):
        s0 = {p: _schedstat(p) for p in pids}
        t0 = time.monotonic()
        time.sleep(span)
        dt = time.monotonic() - t0
        for p in pids:
            c1, w1 = _schedstat(p)
            cpu[p].append((c1 - s0[p][0]) / dt * 100)
            wake[p].append((w1 - s0[p][1]) / dt)
    out = []
    for p in pids:
        roll = read_rollup(p) or {}
        out.append(
            Proc(
                pid=p,
                name=_comm(p),
                pss=roll.get("Pss", 0),
                uss=uss_of(roll),
                cpu_pct=statistics.median(cpu[p]),
                wakeups=statistics.median(wake[p]),
            )
        )
    return out


# -- meshpipe ---------------------------------------------------------------------------


def meshpipe_idle(lab: Lab, crypto: int, args: argparse.Namespace) -> list[Proc]:
    set_tunnel_config(lab, "", f"crypto = {crypto}\n", args.extra)
    lab.start_all()
    try:
        lab.wait_for(lambda: lab.route("b", "a") is not None, 30, "b's route to a")
        time.sleep(args.settle)
        root = int(lab.cli("b", "status")["supervisor"]["pid"])
        # `ip netns exec` is the node's parent, not part of it
        return measure(process_tree(root), args.idle, args.runs)
    finally:
        for n in PAIR:
            lab.stop(n)


# -- yggdrasil -------------------------------------------------------------------------------


def yggdrasil_binary(workdir: Path) -> Path:
    """The Debian package's binary, unpacked (not installed) into ``workdir``."""
    exe = workdir / "ygg" / "usr" / "sbin" / "yggdrasil"
    if exe.exists():
        return exe
    (workdir / "ygg").mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "yggdrasil"], cwd=workdir, check=True)
    deb = next(workdir.glob("yggdrasil_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "ygg")], check=True)
    return exe


def yggdrasil_idle(topo: Topology, args: argparse.Namespace) -> list[Proc]:
    exe = yggdrasil_binary(Path(args.workdir))
    procs: dict[str, subprocess.Popen[Any]] = {}
    try:
        for n in PAIR:
            conf = json.loads(
                subprocess.run(
                    [str(exe), "-genconf", "-json"], capture_output=True, text=True, check=True
                ).stdout
            )
            me = topo.address_towards(n, "b" if n == "a" else "a")
            conf.update(
                Listen=[f"tcp://{me}:{YGG_PORT}"],
                Peers=[] if n == "a" else [f"tcp://{topo.address_towards('a', 'b')}:{YGG_PORT}"],
                MulticastInterfaces=[],
                AdminListen="none",
                IfName="ygg0",
                NodeInfoPrivacy=True,
            )
            path = Path(args.workdir) / f"ygg-{n}.conf"
            path.write_text(json.dumps(conf))
            path.chmod(0o600)
            procs[n] = topo.exec(
                n,
                [str(exe), "-useconffile", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 15
        while "ygg0" not in topo.run("b", ["ip", "link", "show"]).stdout:
            if time.monotonic() > deadline:
                raise BenchError("yggdrasil's TUN did not appear in b")
            time.sleep(0.2)
        time.sleep(args.settle)
        return measure(_inner_pids(procs["b"].pid), args.idle, args.runs)
    finally:
        for p in procs.values():
            stop_process(p, grace=2)


def _inner_pids(wrapper: int) -> list[int]:
    """The program under an ``ip netns exec`` wrapper (it execs: the same pid)."""
    return [p for p in process_tree(wrapper) if _comm(p) not in ("ip",)]


# -- report ------------------------------------------------------------------------------


def summary(system: str, procs: list[Proc]) -> dict[str, Any]:
    return {
        "system": system,
        "processes": len(procs),
        "pss_mb": round(sum(p.pss for p in procs) / MB, 1),
        "uss_mb": round(sum(p.uss for p in procs) / MB, 1),
        "cpu_pct": round(sum(p.cpu_pct for p in procs), 3),
        "wakeups_per_s": round(sum(p.wakeups for p in procs), 1),
        "per_process": [
            {
                "name": p.name,
                "pss_mb": round(p.pss / MB, 2),
                "uss_mb": round(p.uss / MB, 2),
                "cpu_pct": round(p.cpu_pct, 3),
                "wakeups_per_s": round(p.wakeups, 1),
            }
            for p in procs
        ],
    }


def print_results(results: list[dict[str, Any]]) -> None:
    print(
        "| system | processes | total PSS (MB) | total USS (MB) "
        "| idle CPU (% of a core) | wake-ups/s |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['system']} | n/a: {r['error']} | | | | |")
            continue
        print(
            f"| {r['system']} | {r['processes']} | {r['pss_mb']} | {r['uss_mb']} "
            f"| {r['cpu_pct']:.2f} | {r['wakeups_per_s']} |"
        )
    for r in results:
        if "per_process" not in r:
            continue
        print(f"\n{r['system']}: process  PSS  USS (MB)  CPU %  wake-ups/s")
        for p in r["per_process"]:
            print(
                f"  {p['name']:<16} {p['pss_mb']:6.2f} {p['uss_mb']:6.2f} "
                f"{p['cpu_pct']:6.3f} {p['wakeups_per_s']:6.1f}"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.footprint", description=__doc__.split("\n")[0])
    p.add_argument("--crypto", default="1,2,4", help="crypto worker counts (1,2,4)")
    p.add_argument("--idle", type=float, default=30.0, help="idle seconds measured per system")
    p.add_argument("--runs", type=int, default=3, help="windows the idle time is cut into")
    p.add_argument("--settle", type=float, default=15.0, help="seconds after start, first")
    p.add_argument("--others", default="wireguard-go,yggdrasil", help="references to run")
    p.add_argument("--extra", default="", help="raw TOML appended to meshpipe's config")
    p.add_argument("--workdir", default="/tmp/meshpipe-bench-footprint")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    require_root()
    others = [o for o in args.others.split(",") if o]
    if "wireguard-go" in others:
        ensure_packages()
    results: list[dict[str, Any]] = []
    # The default timers (what `meshpipe init` writes), not the Lab's faster ones.
    timing = {k: float(v) for k, v in asdict(TimingSection()).items()}
    with exit_on_signals(), Lab(PAIR, args.workdir, netns=True, timing=timing) as lab:
        assert lab.topo is not None
        for c in [int(x) for x in args.crypto.split(",") if x]:
            log(f"meshpipe, {c} crypto workers")
            results.append(summary(f"meshpipe/{c}cw", meshpipe_idle(lab, c, args)))
        for other in others:
            log(other)
            try:
                if other == "wireguard-go":
                    with wireguard(lab.topo, Path(args.workdir)) as wg:
                        time.sleep(args.settle)
                        procs = measure(_inner_pids(wg["b"].pid), args.idle, args.runs)
                elif other == "yggdrasil":
                    procs = yggdrasil_idle(lab.topo, args)
                else:
                    raise BenchError(f"unknown reference {other!r}")
                results.append(summary(other, procs))
            except (BenchError, OSError, subprocess.CalledProcessError) as exc:
                results.append({"system": other, "error": str(exc)})
    if args.json:
        print(json.dumps({"machine": f"{os.cpu_count()} cores, shared", "results": results}))
    else:
        print_results(results)
    shutil.rmtree(Path(args.workdir) / "wg", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
