"""IP tunnel throughput and latency: raw veth, wireguard-go, yggdrasil and meshpipe.

Run as root with the repository's venv (see bench/README.md):

    .venv/bin/python -m bench.tunnel [--runs 3] [--seconds 5] [--json]

Two namespaces a - b (``meshpipe_workers.labnet.Lab``, one veth, underlay
198.18.1.0/24) carry, in turn and in the same run, ``iperf3`` TCP from a to b
(``--seconds`` long) and ``ping`` (``--pings`` echoes 50 ms apart, the mean RTT) over:

- veth: the raw link, the reference floor;
- wireguard-go: the Debian package (installed with apt when missing), devices
  ``wga``/``wgb`` with tunnel addresses 198.18.210.1/.2;
- yggdrasil: not run. Its addresses are derived from its keys inside 0200::/7 and
  cannot be configured, which the project's network rules forbid (only
  198.18.0.0/15 and fd00::/8); the row says so instead of a number;
- meshpipe: real ``meshpipe run`` nodes with ``[tunnel]`` on, between their overlay
  addresses (fd00::/8), once per crypto worker count in ``--crypto`` (default 1 and
  the number of cores), restarted with ``[workers] crypto = N`` in between.

Each figure is the median of ``--runs`` runs and is printed with its ratio to
wireguard-go; for meshpipe also the added RTT per hop (meshpipe's RTT minus the
raw veth's, over the one hop). Then the total RSS of an idle meshpipe node (the
supervisor and every process under it) is printed for each worker count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
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
    to_json,
)
from meshpipe_workers.labnet import Lab
from meshpipe_workers.metrics import read_rss
from meshpipe_workers.netns import Topology, stop_process

NAMES = ["a", "b"]
MARK = "\n# -- bench.tunnel --"
WG_ADDR = {"a": "198.18.210.1", "b": "198.18.210.2"}
WG_PORT = 51820
DEBIAN = {"iperf3": "iperf3", "wireguard-go": "wireguard-go", "wg": "wireguard-tools"}
YGGDRASIL_NOTE = "not run: its addresses are fixed inside 0200::/7, outside the allowed ranges"


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


def iperf_tcp(topo: Topology, server_addr: str, seconds: int, bind: str | None = None) -> float:
    """Mbit/s received by an iperf3 server in b from a client in a."""
    server = topo.exec("b", ["iperf3", "-s", "-1", "-B", server_addr], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        argv = ["iperf3", "-c", server_addr, "-t", str(seconds), "-J"]
        if bind:
            argv += ["-B", bind]
        res = topo.run("a", argv, timeout=seconds + 30)
        if res.returncode != 0:
            raise BenchError(f"iperf3 to {server_addr}: {res.stdout[-500:]} {res.stderr}")
        out: dict[str, Any] = json.loads(res.stdout)
        return float(out["end"]["sum_received"]["bits_per_second"]) / 1e6
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


def measure(
    rows: list[Row],
    system: str,
    topo: Topology,
    addr: str,
    args: argparse.Namespace,
    bind: str | None = None,
) -> None:
    ping_rtt(topo, addr, 3)  # warm up: handshakes, neighbour discovery
    tput = repeat(lambda _i: iperf_tcp(topo, addr, args.seconds, bind), args.runs, system)
    rows.append(Row("iperf3 TCP", system, tput))
    rtt = repeat(lambda _i: ping_rtt(topo, addr, args.pings), args.runs, f"{system} rtt")
    rows.append(Row("ping RTT", system, rtt, unit="ms"))


# -- wireguard-go --------------------------------------------------------------------------


def run_wireguard(rows: list[Row], topo: Topology, args: argparse.Namespace) -> None:
    with wireguard(topo, Path(args.workdir)):
        measure(rows, "wireguard-go", topo, WG_ADDR["b"], args)


@contextlib.contextmanager
def wireguard(topo: Topology, workdir: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """wireguard-go devices wga/wgb, each the other's one peer; their processes."""
    keys: dict[str, tuple[str, str]] = {}
    for n in NAMES:
        priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
        pub = subprocess.run(
            ["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True
        ).stdout
        keys[n] = (priv.strip(), pub.strip())
    procs: dict[str, subprocess.Popen[bytes]] = {}
    keydir = workdir / "wg"
    keydir.mkdir(parents=True, exist_ok=True)
    try:
        for n in NAMES:
            dev = f"wg{n}"
            env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
            procs[n] = topo.exec(n, ["wireguard-go", dev], env=env, stdout=subprocess.DEVNULL)
        for n in NAMES:
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


# -- meshpipe ------------------------------------------------------------------------------


def run_meshpipe(
    rows: list[Row],
    lab: Lab,
    args: argparse.Namespace,
    crypto: int,
    offload: bool = True,
    udp_offload: bool = True,
) -> int:
    """Measure the tunnel with ``crypto`` crypto workers (TUN offloads and UDP GSO/GRO
    on or off); return the idle node's total RSS in bytes (node b)."""
    assert lab.topo is not None
    set_tunnel_config(
        lab,
        f"offload = {'true' if offload else 'false'}\n",
        f"crypto = {crypto}\nudp_offload = {str(udp_offload).lower()}\n",
    )
    lab.start_all()
    lab.wait_for(lambda: lab.route("a", "b") is not None, 30, "a's route to b")
    ident = lab.cli("b", "id")
    addr = str(ident["ipv6"])
    lab.wait_for(
        lambda: addr in lab.topo.run("b", ["ip", "addr", "show", "mesh0"]).stdout,  # type: ignore[union-attr]
        15,
        "b's TUN device",
    )
    time.sleep(2.0)  # idle: measure memory before any tunnel traffic
    rss = node_rss(lab, "b")
    measure(rows, meshpipe_system(crypto, offload, udp_offload), lab.topo, addr, args)
    st = lab.cli("a", "status")
    log(f"  meshpipe a: tunnel {json.dumps(st.get('tunnel', {}).get('drops', {}))}")
    for n in NAMES:
        lab.stop(n)
    return rss


def set_tunnel_config(lab: Lab, tunnel: str, workers: str, extra: str = "") -> None:
    """Every node's config: its Lab part, then ``[tunnel]`` (on, device mesh0, plus
    ``tunnel``), ``[workers]`` (``workers``) and raw ``extra`` TOML."""
    for n in NAMES:
        cfg = lab.nodes[n].config
        base = cfg.read_text().split(MARK)[0]
        cfg.write_text(
            f'{base}{MARK}\n[tunnel]\nenabled = true\nname = "mesh0"\n{tunnel}'
            f"\n[workers]\n{workers}\n{extra}\n"
        )


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


def node_rss(lab: Lab, name: str) -> int:
    """RSS of the node's supervisor and all its descendants (workers, helpers)."""
    st = lab.cli(name, "status")
    return sum(read_rss(pid) or 0 for pid in process_tree(int(st["supervisor"]["pid"])))


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.tunnel", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--seconds", type=int, default=5, help="iperf3 duration per run")
    p.add_argument("--pings", type=int, default=20, help="echoes per RTT sample")
    p.add_argument("--workdir", default="/tmp/meshpipe-bench-tunnel")
    p.add_argument(
        "--crypto", default="1,auto", help="crypto worker counts to run meshpipe with (1,auto)"
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
    require_root()
    ensure_packages()
    rows: list[Row] = []
    counts = crypto_counts(args.crypto)
    rss: dict[int, int] = {}
    with exit_on_signals(), Lab(NAMES, args.workdir, netns=True) as lab:
        assert lab.topo is not None
        topo = lab.topo
        log("veth")
        measure(rows, "veth", topo, topo.address_towards("b", "a"), args)
        log("wireguard-go")
        try:
            run_wireguard(rows, topo, args)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            rows += [Row(c, "wireguard-go", error=str(exc)) for c in ("iperf3 TCP", "ping RTT")]
        rows += [
            Row("iperf3 TCP", "yggdrasil", error=YGGDRASIL_NOTE),
            Row("ping RTT", "yggdrasil", unit="ms", error=YGGDRASIL_NOTE),
        ]
        for k in counts:
            log(f"meshpipe, {k} crypto worker(s)")
            rss[k] = run_meshpipe(rows, lab, args, k)
        if not args.skip_no_offload:  # what the Linux offloads are worth
            log(f"meshpipe, {counts[0]} crypto worker(s), TUN offloads off")
            run_meshpipe(rows, lab, args, counts[0], offload=False)
            log(f"meshpipe, {counts[0]} crypto worker(s), UDP GSO/GRO off")
            run_meshpipe(rows, lab, args, counts[0], udp_offload=False)
    rows.sort(key=lambda r: r.case)
    subject = meshpipe_system(counts[-1])
    meta = {
        "idle_node_rss_bytes": {str(k): v for k, v in rss.items()},
        "runs": args.runs,
        "seconds": args.seconds,
        "crypto_workers": counts,
    }
    if args.json:
        print(to_json(rows, subject, ["wireguard-go", "veth"], **meta))
        return 0
    for case in ("iperf3 TCP", "ping RTT"):
        print_table([r for r in rows if r.case == case], subject, ["wireguard-go", "veth"])
        print()
    by = {(r.case, r.system): r.median for r in rows}
    wg_t, wg_r = by.get(("iperf3 TCP", "wireguard-go")), by.get(("ping RTT", "wireguard-go"))
    veth_r = by.get(("ping RTT", "veth"))
    for k in counts:
        t, r = by.get(("iperf3 TCP", meshpipe_system(k))), by.get(("ping RTT", meshpipe_system(k)))
        parts = [f"meshpipe with {k} crypto worker(s):"]
        if t is not None and wg_t:
            parts.append(f"throughput {t / wg_t:.3f}x wireguard-go;")
        if r is not None and veth_r is not None:
            parts.append(f"added RTT per hop {r - veth_r:.3f} ms;")
        if r is not None and wg_r:
            parts.append(f"RTT {r / wg_r:.2f}x wireguard-go;")
        parts.append(f"idle RSS, all workers {rss[k] / 1e6:.1f} MB")
        print(" ".join(parts))
    on = by.get(("iperf3 TCP", meshpipe_system(counts[0])))
    for what, system in (
        ("TUN offloads (TSO)", meshpipe_system(counts[0], offload=False)),
        ("UDP GSO/GRO", meshpipe_system(counts[0], udp_offload=False)),
    ):
        off = by.get(("iperf3 TCP", system))
        if off and on:
            print(f"{what}: {on / off:.2f}x the throughput without them ({counts[0]} cw)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
