"""Services goodput: curl through `meshpipe forward` and SOCKS, beside the tunnel and Reticulum.

Run as root with the repository's venv (see bench/README.md):

    .venv/bin/python -m bench.services [--size-mb 200] [--runs 3] [--parts single,concurrent]

Three namespaces c - a - b (``meshpipe_workers.labnet.Lab``, underlay 198.18.0.0/15),
real ``meshpipe run`` nodes with ``[tunnel]`` on. b and c each serve a file over HTTP
(bench/http_sendfile.py, ``sendfile``: next to no CPU) and expose it as service
``web`` to a; b is also an exit for a. Part ``single`` (1 hop, a downloads from b),
all in the same run:

- tunnel: ``iperf3`` TCP from a to b between their overlay addresses (bench/tunnel.py);
- forward: ``curl`` in a through ``meshpipe forward web@b`` (``--size-mb``);
- socks: ``curl --socks5-hostname`` in a through ``meshpipe socks --via b`` to b's
  server (the exit's policy allows just that address and port);
- forward/control, socks/control: the same with ``MESHPIPE_STREAM_HANDOFF=off``, the
  streams kept in the control worker as before workers/stream_handoff.py (``--before``);
- reticulum: one RNS.Resource a -> b (bench/msp_goodput.py; ``--rns-size-mb``).

Part ``concurrent``: two downloads at once in a, one through a forward to b and one
to c (whose SIDs are made to fall in different shards of 2), with ``[workers] crypto``
1 and 2; the figure is both files' bytes over the wall time of the pair.

Every download is checked byte-exact (sha256 in the namespace). Goodput of one curl is
bytes / (time of the last byte - time of the first byte); figures are medians of
``--runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/services.py
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
    to_json,
)
from bench.msp_goodput import Payload, ensure_rns, measure, rns_case
from bench.tunnel import iperf_tcp
from meshpipe.dataplane import shard_of
from meshpipe.identity import Sid
from meshpipe_workers.labnet import Lab
from meshpipe_workers.netns import stop_process
from meshpipe_workers.stream_handoff import HANDOFF_ENV

NAMES = ["c", "a", "b"]
MARK = "\n# -- bench.services --"
HTTP_PORT = 8080
FWD_PORT = {"b": 9001, "c": 9002}
SOCKS_PORT = 1080
SERVER = REPO / "bench" / "http_sendfile.py"
SUBJECT = "forward"
REFERENCES = ["tunnel", "reticulum"]
PARTS = ["single", "concurrent"]
CURL_W = "%{stderr}%{size_download} %{time_starttransfer} %{time_total}\n"


def node_config(lab: Lab, name: str, crypto: int | str) -> str:
    a = lab.nodes["a"].sid
    workers = f"crypto = {json.dumps(crypto)}"  # a number, or "auto": one per core
    text = f'\n[tunnel]\nenabled = true\nname = "mesh0"\n\n[workers]\n{workers}\n'
    if name in ("b", "c"):
        text += f'\n[[service]]\nname = "web"\nto = "127.0.0.1:{HTTP_PORT}"\nallow = ["{a}"]\n'
    if name == "b":
        assert lab.topo is not None
        addr = lab.topo.address_towards("b", "a")
        text += (
            f'\n[exit]\nenabled = true\nallow = ["{a}"]\n'
            f'allow_networks = ["{addr}/32"]\nallow_ports = ["{HTTP_PORT}"]\n'
        )
    return text


def configure(lab: Lab, crypto: int | str) -> None:
    for n in NAMES:
        cfg = lab.nodes[n].config
        base = cfg.read_text().split(MARK)[0]
        cfg.write_text(base + MARK + node_config(lab, n, crypto))


def apart_in_shards(lab: Lab) -> None:
    """Give c a new key until b and c fall in different shards of 2 crypto workers."""
    for _ in range(20):
        if shard_of(bytes(Sid.parse(lab.nodes["b"].sid)), 2) != shard_of(
            bytes(Sid.parse(lab.nodes["c"].sid)), 2
        ):
            return
        lab._configure(NAMES.index("c"), "c")
    raise BenchError("could not put b and c in different shards")


def start(lab: Lab, handoff: bool = True) -> None:
    if handoff:
        os.environ.pop(HANDOFF_ENV, None)
    else:
        os.environ[HANDOFF_ENV] = "off"  # inherited by the nodes Lab starts
    try:
        lab.restart_all()
    finally:
        os.environ.pop(HANDOFF_ENV, None)
    for peer in ("b", "c"):
        lab.wait_for(lambda p=peer: lab.route("a", p) is not None, 60, f"a's route to {peer}")
        lab.cli("a", "ping", lab.nodes[peer].sid, "--count", "1")  # the session first
    for peer, port in FWD_PORT.items():
        res = lab.run("a", "forward", f"web@{lab.nodes[peer].sid}", "--listen", f"127.0.0.1:{port}")
        if res.returncode != 0:
            raise BenchError(f"forward to {peer}: {res.stderr.strip()}")
    res = lab.run("a", "socks", "--listen", f"127.0.0.1:{SOCKS_PORT}", "--via", lab.nodes["b"].sid)
    if res.returncode != 0:
        raise BenchError(f"socks: {res.stderr.strip()}")


def curl_argv(url: str, socks: bool = False) -> list[str]:
    argv = ["curl", "-sS", "--fail", "--max-time", "600", "-w", CURL_W, "-o", "-"]
    if socks:
        argv += ["--socks5-hostname", f"127.0.0.1:{SOCKS_PORT}"]
    return [*argv, url]


def curl_shell(argv: list[str]) -> list[str]:
    """Run curl in the namespace with its output hashed there: one line ``sha256`` on
    stdout, curl's ``-w`` line on stderr."""
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)
    return ["bash", "-o", "pipefail", "-c", f"{quoted} | sha256sum"]


def _parse(payload: Payload, out: str, err: str, what: str) -> tuple[int, float, float]:
    m = re.search(r"(\d+) ([\d.]+) ([\d.]+)\s*$", err)
    digest = out.split()[0] if out.split() else ""
    if m is None or int(m.group(1)) != payload.size or digest != payload.sha256:
        raise BenchError(f"{what}: got {err.strip()[-300:]!r} sha256 {digest}")
    return int(m.group(1)), float(m.group(2)), float(m.group(3))


def curl_once(lab: Lab, url: str, payload: Payload, socks: bool, what: str) -> float:
    assert lab.topo is not None
    res = lab.topo.run("a", curl_shell(curl_argv(url, socks)), timeout=900)
    size, first, last = _parse(payload, res.stdout, res.stderr, what)
    return mbit_per_s(size, last - first)


def forward_url(peer: str) -> str:
    return f"http://127.0.0.1:{FWD_PORT[peer]}/payload.bin"


def socks_url(lab: Lab) -> str:
    assert lab.topo is not None
    return f"http://{lab.topo.address_towards('b', 'a')}:{HTTP_PORT}/payload.bin"


def moved(lab: Lab) -> int:
    return int(lab.cli("a", "status")["counters"].get("handoff.moved", 0))


def curl_rows(rows: list[Row], lab: Lab, payload: Payload, runs: int, suffix: str) -> None:
    for system, url, socks in (
        ("forward", forward_url("b"), False),
        ("socks", socks_url(lab), True),
    ):
        name = system + suffix
        log(f"{name} ({payload.label})")
        fn = partial(
            repeat,
            lambda _i, u=url, s=socks, n=name: curl_once(lab, u, payload, s, n),
            runs,
            name,
        )
        measure(rows, "1 hop", name, "", fn)
    log(f"  a's streams handed to crypto workers so far: {moved(lab)}")


def concurrent_once(lab: Lab, payload: Payload) -> float:
    """Both downloads at once; Mbit/s of the pair over its wall time."""
    assert lab.topo is not None
    procs = []
    t0 = time.monotonic()
    for peer in FWD_PORT:
        procs.append(
            (
                peer,
                lab.topo.exec(
                    "a",
                    curl_shell(curl_argv(forward_url(peer))),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    total = 0
    for peer, p in procs:
        try:
            out, err = p.communicate(timeout=900)
        finally:
            stop_process(p)
        total += _parse(payload, out, err, f"concurrent, from {peer}")[0]
    return mbit_per_s(total, time.monotonic() - t0)


def concurrent_rows(rows: list[Row], lab: Lab, payload: Payload, runs: int) -> None:
    for crypto in (1, 2):
        configure(lab, crypto)
        start(lab)
        name = f"2 flows/{crypto}cw"
        log(f"{name} ({payload.label} each)")
        fn = partial(repeat, lambda _i: concurrent_once(lab, payload), runs, name)
        measure(rows, "2 peers", name, "a downloads from b and c at once", fn)


def serve(lab: Lab, root: Path) -> list[subprocess.Popen[str]]:
    assert lab.topo is not None
    procs = []
    for n in ("b", "c"):
        p = lab.topo.exec(
            n,
            [sys.executable, str(SERVER), "0.0.0.0", str(HTTP_PORT), str(root)],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        assert p.stdout is not None
        LineReader(p.stdout).expect("ready", 10, f"the HTTP server in {n}")
    return procs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.services", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--size-mb", type=float, default=200.0, help="the file curl downloads")
    p.add_argument("--rns-size-mb", type=float, default=2.0, help="Reticulum's file")
    p.add_argument("--seconds", type=int, default=5, help="iperf3 duration per run")
    p.add_argument("--parts", default="single", help=f"comma-separated subset of {PARTS}")
    p.add_argument(
        "--before", action="store_true", help="also with the streams in the control worker"
    )
    p.add_argument("--no-reticulum", action="store_true", help="leave Reticulum out")
    args = p.parse_args(argv)
    args.parts = [s for s in args.parts.split(",") if s]
    if unknown := set(args.parts) - set(PARTS):
        p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_root()
    rns = "single" in args.parts and not args.no_reticulum
    if rns:
        ensure_rns()
    workdir = Path(tempfile.mkdtemp(prefix="meshpipe-bench-"))
    rows: list[Row] = []
    servers: list[subprocess.Popen[str]] = []
    try:
        root = workdir / "www"
        root.mkdir()
        payload = Payload(root / "payload.bin", int(args.size_mb * 1e6), "")
        payload.sha256 = make_payload(payload.path, payload.size)
        with exit_on_signals(), Lab(NAMES, workdir / "lab", netns=True) as lab:
            assert lab.topo is not None
            apart_in_shards(lab)
            servers = serve(lab, root)
            if "single" in args.parts:
                if rns:
                    rns_p = Payload(workdir / "payload-rns.bin", int(args.rns_size_mb * 1e6), "")
                    rns_p.sha256 = make_payload(rns_p.path, rns_p.size)
                    log(f"reticulum 1 hop ({rns_p.label})")
                    fn = partial(rns_case, lab.topo, "a", "b", rns_p, args.runs, workdir)
                    measure(rows, "1 hop", "reticulum", f"moved {rns_p.label} per run", fn)
                configure(lab, "auto")
                start(lab)
                addr = str(lab.cli("b", "id")["ipv6"])
                lab.wait_for(
                    lambda: addr in lab.topo.run("b", ["ip", "addr", "show", "mesh0"]).stdout,  # type: ignore[union-attr]
                    15,
                    "b's TUN device",
                )
                log("tunnel iperf3 TCP 1 hop")
                fn = partial(
                    repeat, lambda _i: iperf_tcp(lab.topo, addr, args.seconds), args.runs, "tunnel"
                )
                measure(rows, "1 hop", "tunnel", f"iperf3 TCP, {args.seconds} s", fn)
                curl_rows(rows, lab, payload, args.runs, "")
                if args.before:
                    start(lab, handoff=False)
                    curl_rows(rows, lab, payload, args.runs, "/control")
            if "concurrent" in args.parts:
                concurrent_rows(rows, lab, payload, args.runs)
    finally:
        for p in servers:
            stop_process(p)
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {"runs": args.runs, "size_bytes": payload.size, "busy_machine": True}
    if args.json:
        print(to_json(rows, SUBJECT, REFERENCES, **meta))
    else:
        print_table([r for r in rows if r.case == "1 hop"], SUBJECT, REFERENCES)
        conc = [r for r in rows if r.case != "1 hop"]
        if conc:
            print_table(conc, "2 flows/2cw", ["2 flows/1cw"])
        by = {r.system: r.median for r in rows}
        for s in ("forward", "socks"):
            t, f = by.get("tunnel"), by.get(s)
            if t and f:
                print(f"{s} / tunnel iperf3: {f / t:.2f} (target >= 0.9)")
            if by.get("reticulum") and f:
                print(f"{s} / reticulum: {f / by['reticulum']:.0f}x (target >= 10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
