"""IP tunnel throughput, latency and CPU cost: raw veth, wireguard-go, yggdrasil, meshpipe.

Run as root with the repository's venv (see bench/README.md):

    .venv/bin/python -m bench.tunnel [--runs 3] [--seconds 5] [--json]

Four namespaces a - b - c - d in a line (``meshpipe_workers.labnet.Lab``, underlay
198.18.0.0/15) carry, in turn and in the same run, ``iperf3`` TCP (``--seconds``
long) and ``ping`` (``--pings`` echoes 50 ms apart, the mean RTT), from a to b
(1 hop) and, with ``--hops 1,3`` (the default), from a to d (3 hops), over:

- veth: the raw links (static routes and forwarding in b and c for 3 hops), the
  reference floor;
- wireguard-go (1 hop): the Debian package, devices ``wga``/``wgb`` with tunnel
  addresses 198.18.210.1/.2;
- yggdrasil: the Debian package, one node per namespace peered over TCP with its
  line neighbours; its own addresses (inside 0200::/7, fixed by its keys) exist only
  on the ``ygg0`` devices inside these namespaces and never leave them;
- meshpipe: real ``meshpipe run`` nodes with ``[tunnel]`` on, between their overlay
  addresses (fd00::/8), once per crypto worker count in ``--crypto`` (default 1 and
  the number of cores), restarted with ``[workers] crypto = N`` in between.

Each iperf3 run also takes the CPU seconds (user + system) that the tunnel's own
processes on the path used during it (meshpipe: every process of the nodes on the
path; wireguard-go and yggdrasil: their daemons; the kernel's share of veth, TCP
and the TUN is in nobody's column), per GB received: ``CPU s/GB``.

Each figure is the median of ``--runs`` runs and is printed with its ratios to
yggdrasil and wireguard-go; then per meshpipe count the added RTT per hop
(meshpipe's RTT minus the raw veth's over the same hops, divided by the hops) and
the 3-hop throughput as a share of the 1-hop one. Then the total RSS of an idle
meshpipe node (the supervisor and every process under it) for each worker count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/tunnel.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BenchError,
    Row,
    add_common_args,
    exit_on_signals,
    log,
    print_table,
    process_tree,
    repeat,
    require_root,
    route_line,
    to_json,
)
from meshpipe_workers.labnet import Lab
from meshpipe_workers.metrics import read_rss
from meshpipe_workers.netns import Topology, stop_process

NAMES = ["a", "b", "c", "d"]
PAIR = NAMES[:2]
MARK = "\n# -- bench.tunnel --"
WG_ADDR = {"a": "198.18.210.1", "b": "198.18.210.2"}
WG_PORT = 51820
YGG_PORT = 12345
DEBIAN = {
    "iperf3": "iperf3",
    "wireguard-go": "wireguard-go",
    "wg": "wireguard-tools",
    "yggdrasil": "yggdrasil",
}
TCP = "iperf3 TCP"
RTT = "ping RTT"
CPU = "CPU s/GB"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def ensure_packages() -> None:
    """Install the Debian packages whose programs are missing (apt-get, as root)."""
    missing = sorted({pkg for prog, pkg in DEBIAN.items() if shutil.which(prog) is None})
    if not missing:
        return
    log(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        env=env,
        check=True,
    )


# -- measurements --------------------------------------------------------------------------

Pids = Callable[[], list[int]]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` used so far (gone ones: 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def iperf_tcp(
    topo: Topology, dst: str, server_addr: str, seconds: int, pids: Pids
) -> tuple[float, float]:
    """(Mbit/s received by an iperf3 server in ``dst`` from a client in a, CPU s/GB of
    the processes ``pids`` during it)."""
    server = topo.exec(dst, ["iperf3", "-s", "-1", "-B", server_addr], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        argv = ["iperf3", "-c", server_addr, "-t", str(seconds), "-J"]
        procs = pids()
        cpu0 = cpu_seconds(procs)
        res = topo.run("a", argv, timeout=seconds + 30)
        cpu = cpu_seconds(procs) - cpu0
        if res.returncode != 0:
            raise BenchError(f"iperf3 to {server_addr}: {res.stdout[-500:]} {res.stderr}")
        out: dict[str, Any] = json.loads(res.stdout)
        got = out["end"]["sum_received"]
        gb = float(got["bytes"]) / 1e9
        return float(got["bits_per_second"]) / 1e6, cpu / gb if gb else math.inf
    finally:
        try:
            server.wait(5)  # a one-off server (-1) ends by itself after the test
        except subprocess.TimeoutExpired:
            stop_process(server, grace=2)


def ping_rtt(topo: Topology, addr: str, count: int) -> float:
    """Mean RTT in ms of ``count`` pings from a to ``addr``."""
    res = topo.run("a", ["ping", "-q", "-c", str(count), "-i", "0.05", "-W", "2", addr])
    m = re.search(r"= [\d.]+/([\d.]+)/", res.stdout)
    if res.returncode != 0 or m is None:
        raise BenchError(f"ping {addr}: {res.stdout[-300:]} {res.stderr}")
    return float(m.group(1))


def case(kind: str, hops: int) -> str:
    return f"{kind}, {hops} hop{'s' if hops > 1 else ''}"


def measure(
    rows: list[Row],
    system: str,
    hops: int,
    topo: Topology,
    dst: str,
    addr: str,
    args: argparse.Namespace,
    pids: Pids | None = None,
) -> None:
    ping_rtt(topo, addr, 3)  # warm up: handshakes, neighbour discovery
    tputs: list[float] = []
    cpus: list[float] = []
    for i in range(args.runs):
        t, c = iperf_tcp(topo, dst, addr, args.seconds, pids or list)
        tputs.append(t)
        cpus.append(c)
        log(f"  {system}, {hops} hop(s): run {i + 1}/{args.runs}: {t:.1f} Mbit/s, {c:.2f} CPU s/GB")
    rows.append(Row(case(TCP, hops), system, tputs))
    if pids is not None:
        rows.append(Row(case(CPU, hops), system, cpus, unit="s/GB"))
    rtt = repeat(lambda _i: ping_rtt(topo, addr, args.pings), args.runs, f"{system} rtt")
    rows.append(Row(case(RTT, hops), system, rtt, unit="ms"))


# -- wireguard-go --------------------------------------------------------------------------


def run_wireguard(rows: list[Row], topo: Topology, args: argparse.Namespace) -> None:
    """1 hop, a to b."""
    with wireguard(topo, Path(args.workdir)) as procs:
        measure(
            rows,
            "wireguard-go",
            1,
            topo,
            "b",
            WG_ADDR["b"],
            args,
            lambda: [p.pid for p in procs.values()],
        )


@contextlib.contextmanager
def wireguard(topo: Topology, workdir: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """wireguard-go devices wga/wgb, each the other's one peer; their processes."""
    keys: dict[str, tuple[str, str]] = {}
    for n in PAIR:
        priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
        pub = subprocess.run(
            ["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True
        ).stdout
        keys[n] = (priv.strip(), pub.strip())
    procs: dict[str, subprocess.Popen[bytes]] = {}
    keydir = workdir / "wg"
    keydir.mkdir(parents=True, exist_ok=True)
    try:
        for n in PAIR:
            dev = f"wg{n}"
            env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
            procs[n] = topo.exec(n, ["wireguard-go", dev], env=env, stdout=subprocess.DEVNULL)
        for n in PAIR:
            dev, other = f"wg{n}", ("b" if n == "a" else "a")
            keyfile = keydir / f"{n}.key"
            keyfile.write_text(keys[n][0] + "\n")
            keyfile.chmod(0o600)
            _wait_dev(topo, n, dev)
            peer_ep = f"{topo.address_towards(other, n)}:{WG_PORT}"
            cmds = [
                ["wg", "set", dev, "private-key", str(keyfile), "listen-port", str(WG_PORT)],
                [
                    *("wg", "set", dev, "peer", keys[other][1]),
                    *("allowed-ips", f"{WG_ADDR[other]}/32", "endpoint", peer_ep),
                ],
                ["ip", "addr", "add", f"{WG_ADDR[n]}/24", "dev", dev],
                ["ip", "link", "set", dev, "up"],
            ]
            for c in cmds:
                res = topo.run(n, c)
                if res.returncode != 0:
                    raise BenchError(f"{' '.join(c)}: {res.stderr.strip()}")
        yield procs
    finally:
        for p in procs.values():
            stop_process(p, grace=2)


def _wait_dev(topo: Topology, name: str, dev: str) -> None:
    deadline = time.monotonic() + 10
    while topo.run(name, ["ip", "link", "show", dev]).returncode != 0:
        if time.monotonic() > deadline:
            raise BenchError(f"device {dev} did not appear in {name}")
        time.sleep(0.1)


# -- yggdrasil -----------------------------------------------------------------------------


def run_yggdrasil(
    rows: list[Row], topo: Topology, hops: list[int], args: argparse.Namespace
) -> None:
    """One node per namespace on the path, peered over TCP with its line neighbours."""
    path = NAMES[: max(hops) + 1]
    workdir = Path(args.workdir) / "ygg"
    workdir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen[Any]] = {}
    try:
        addrs: dict[str, str] = {}
        for k, n in enumerate(path):
            res = subprocess.run(
                ["yggdrasil", "-genconf", "-json"], capture_output=True, text=True, check=True
            )
            conf = json.loads(res.stdout)
            mine = [topo.address_towards(n, m) for m in path[max(0, k - 1) : k + 2] if m != n]
            conf["Listen"] = [f"tcp://{a}:{YGG_PORT}" for a in mine]
            # Each node dials its left neighbour (started, and listening, before it):
            # one TCP peering per link.
            conf["Peers"] = (
                [f"tcp://{topo.address_towards(path[k - 1], n)}:{YGG_PORT}"] if k else []
            )
            conf["MulticastInterfaces"] = []
            conf["AdminListen"] = "none"
            conf["IfName"] = "ygg0"
            conf["NodeInfoPrivacy"] = True
            cfile = workdir / f"{n}.conf"
            cfile.write_text(json.dumps(conf))
            cfile.chmod(0o600)
            res = subprocess.run(
                ["yggdrasil", "-useconffile", str(cfile), "-address"],
                capture_output=True,
                text=True,
                check=True,
            )
            addrs[n] = res.stdout.strip()
            procs[n] = topo.exec(
                n,
                ["yggdrasil", "-useconffile", str(cfile), "-logto", str(workdir / f"{n}.log")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _wait_dev(topo, n, "ygg0")  # its listener is up before the next node dials it
        for h in hops:
            dst = NAMES[h]
            on_path = [procs[m].pid for m in NAMES[: h + 1]]
            _wait_ping(topo, addrs[dst])
            measure(rows, "yggdrasil", h, topo, dst, addrs[dst], args, on_path.copy)
    finally:
        for p in procs.values():
            stop_process(p, grace=2)


def _wait_ping(topo: Topology, addr: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while topo.run("a", ["ping", "-c", "1", "-W", "1", addr]).returncode != 0:
        if time.monotonic() > deadline:
            raise BenchError(f"{addr} does not answer pings from a")


# -- meshpipe ------------------------------------------------------------------------------


def run_meshpipe(
    rows: list[Row],
    lab: Lab,
    hops: list[int],
    args: argparse.Namespace,
    crypto: int,
    offload: bool = True,
    udp_offload: bool = True,
) -> int:
    """Measure the tunnel with ``crypto`` crypto workers (TUN offloads and UDP GSO/GRO
    on or off) over each hop count; return the idle node's total RSS in bytes (node b)."""
    assert lab.topo is not None
    path = NAMES[: max(hops) + 1]
    set_tunnel_config(
        lab,
        f"offload = {'true' if offload else 'false'}\n",
        f"crypto = {crypto}\nudp_offload = {str(udp_offload).lower()}\n",
        names=path,
    )
    lab.start_all()
    rss = 0
    system = meshpipe_system(crypto, offload, udp_offload)
    for h in hops:
        dst = NAMES[h]
        lab.wait_for(partial(lab.route, "a", dst), 40, f"a's route to {dst}")
        addr = str(lab.cli(dst, "id")["ipv6"])
        lab.wait_for(partial(_has_address, lab.topo, dst, addr), 15, f"{dst}'s TUN device")
        if not rss:
            time.sleep(2.0)  # idle: measure memory before any tunnel traffic
            rss = node_rss(lab, "b")
        on_path = [p for m in NAMES[: h + 1] for p in lab.node_pids(m)]
        measure(rows, system, h, lab.topo, dst, addr, args, on_path.copy)
    st = lab.cli("a", "status")
    log(f"  meshpipe a: tunnel {json.dumps(st.get('tunnel', {}).get('drops', {}))}")
    for n in NAMES:
        lab.stop(n)
    return rss


def set_tunnel_config(
    lab: Lab, tunnel: str, workers: str, extra: str = "", names: list[str] | None = None
) -> None:
    """Each node's config (``names``, default all): its Lab part, then ``[tunnel]`` (on,
    device mesh0, plus ``tunnel``), ``[workers]`` (``workers``) and raw ``extra`` TOML."""
    for n in names if names is not None else list(lab.nodes):
        cfg = lab.nodes[n].config
        base = cfg.read_text().split(MARK)[0]
        cfg.write_text(
            f'{base}{MARK}\n[tunnel]\nenabled = true\nname = "mesh0"\n{tunnel}'
            f"\n[workers]\n{workers}\n{extra}\n"
        )


def _has_address(topo: Topology, name: str, addr: str) -> bool:
    return addr in topo.run(name, ["ip", "addr", "show", "mesh0"]).stdout


def meshpipe_system(crypto: int, offload: bool = True, udp_offload: bool = True) -> str:
    return (
        f"meshpipe/{crypto}cw"
        + ("" if offload else "/no-tun-offload")
        + ("" if udp_offload else "/no-udp-gso")
    )


def crypto_counts(text: str) -> list[int]:
    cores = os.cpu_count() or 1
    out = [cores if c.strip() == "auto" else int(c) for c in text.split(",") if c.strip()]
    if not out or min(out) < 1:
        raise SystemExit("--crypto: a comma-separated list of worker counts >= 1 or 'auto'")
    return list(dict.fromkeys(out))


def hop_counts(text: str) -> list[int]:
    out = sorted({int(h) for h in text.split(",") if h.strip()})
    if not out or out[0] < 1 or out[-1] > len(NAMES) - 1:
        raise SystemExit(f"--hops: a comma-separated list of 1..{len(NAMES) - 1}")
    return out


def node_rss(lab: Lab, name: str) -> int:
    """RSS of the node's supervisor and all its descendants (workers, helpers)."""
    st = lab.cli(name, "status")
    return sum(read_rss(pid) or 0 for pid in process_tree(int(st["supervisor"]["pid"])))


# -- main ------------------------------------------------------------------------------------

REFERENCES = ["yggdrasil", "wireguard-go", "veth"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.tunnel", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--seconds", type=int, default=5, help="iperf3 duration per run")
    p.add_argument("--pings", type=int, default=20, help="echoes per RTT sample")
    p.add_argument("--workdir", default="/tmp/meshpipe-bench-tunnel")
    p.add_argument(
        "--crypto", default="1,auto", help="crypto worker counts to run meshpipe with (1,auto)"
    )
    p.add_argument("--hops", default="1,3", help="hop counts to measure (1,3)")
    p.add_argument(
        "--systems",
        default="veth,wireguard-go,yggdrasil,meshpipe",
        help="which systems to run (comma-separated; default all)",
    )
    p.add_argument(
        "--skip-no-offload",
        action="store_true",
        help="skip the runs with TUN offloads and UDP GSO/GRO off (what they are worth)",
    )
    p.set_defaults(runs=3)
    args = p.parse_args(argv)
    if args.runs < 3:
        raise SystemExit("--runs must be at least 3 (the median of at least 3 runs)")
    systems = set(args.systems.split(","))
    require_root()
    ensure_packages()
    rows: list[Row] = []
    counts = crypto_counts(args.crypto)
    hops = hop_counts(args.hops)
    rss: dict[int, int] = {}
    with exit_on_signals(), Lab(NAMES, args.workdir, netns=True) as lab:
        assert lab.topo is not None
        topo = lab.topo
        if "veth" in systems:
            route_line(topo)
            for h in hops:
                log(f"veth, {h} hop(s)")
                dst = NAMES[h]
                measure(rows, "veth", h, topo, dst, topo.address_towards(dst, NAMES[h - 1]), args)
        if "wireguard-go" in systems and 1 in hops:
            log("wireguard-go")
            try:
                run_wireguard(rows, topo, args)
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                rows += [Row(case(c, 1), "wireguard-go", error=str(exc)) for c in (TCP, RTT)]
        if "yggdrasil" in systems:
            log("yggdrasil")
            try:
                run_yggdrasil(rows, topo, hops, args)
            except (BenchError, OSError, subprocess.SubprocessError, ValueError) as exc:
                rows += [
                    Row(case(c, h), "yggdrasil", error=str(exc)) for c in (TCP, RTT) for h in hops
                ]
        if "meshpipe" in systems:
            for k in counts:
                log(f"meshpipe, {k} crypto worker(s)")
                rss[k] = run_meshpipe(rows, lab, hops, args, k)
            if not args.skip_no_offload:  # what the Linux offloads are worth
                log(f"meshpipe, {counts[0]} crypto worker(s), TUN offloads off")
                run_meshpipe(rows, lab, [1], args, counts[0], offload=False)
                log(f"meshpipe, {counts[0]} crypto worker(s), UDP GSO/GRO off")
                run_meshpipe(rows, lab, [1], args, counts[0], udp_offload=False)
    rows.sort(key=lambda r: r.case)
    subject = meshpipe_system(counts[-1])
    meta = {
        "idle_node_rss_bytes": {str(k): v for k, v in rss.items()},
        "runs": args.runs,
        "seconds": args.seconds,
        "crypto_workers": counts,
        "hops": hops,
    }
    if args.json:
        print(to_json(rows, subject, REFERENCES, **meta))
        return 0
    for kind in (TCP, RTT, CPU):
        print_table([r for r in rows if r.case.startswith(kind)], subject, REFERENCES)
        print()
    by = {(r.case, r.system): r.median for r in rows}
    for k in counts:
        system = meshpipe_system(k)
        parts = [f"meshpipe with {k} crypto worker(s):"]
        for h in hops:
            t, r = by.get((case(TCP, h), system)), by.get((case(RTT, h), system))
            for ref in REFERENCES[:2]:
                rt = by.get((case(TCP, h), ref))
                if t is not None and rt:
                    parts.append(f"{h} hop(s) throughput {t / rt:.2f}x {ref};")
            veth_r = by.get((case(RTT, h), "veth"))
            if r is not None and veth_r is not None:
                parts.append(f"added RTT per hop ({h}) {(r - veth_r) / h:.3f} ms;")
        t1, t3 = by.get((case(TCP, 1), system)), by.get((case(TCP, max(hops)), system))
        if max(hops) > 1 and t1 and t3:
            parts.append(f"{max(hops)} hops / 1 hop throughput {t3 / t1:.2f};")
        if k in rss:
            parts.append(f"idle RSS, all workers {rss[k] / 1e6:.1f} MB")
        print(" ".join(parts))
    on = by.get((case(TCP, 1), meshpipe_system(counts[0])))
    for what, system in (
        ("TUN offloads (TSO)", meshpipe_system(counts[0], offload=False)),
        ("UDP GSO/GRO", meshpipe_system(counts[0], udp_offload=False)),
    ):
        off = by.get((case(TCP, 1), system))
        if off and on:
            print(f"{what}: {on / off:.2f}x the throughput without them ({counts[0]} cw)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
