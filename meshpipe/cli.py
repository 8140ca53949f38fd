"""The `meshpipe` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from meshpipe import __version__
from meshpipe.errors import MeshpipeError

DEFAULT_CONFIG = "/etc/meshpipe/meshpipe.toml"


def _config_path(args: argparse.Namespace) -> str:
    return str(getattr(args, "config", None) or os.environ.get("MESHPIPE_CONFIG") or DEFAULT_CONFIG)


def _control_path(args: argparse.Namespace) -> str:
    from meshpipe.config import load_config

    return load_config(_config_path(args)).node.control_socket


def _ask(args: argparse.Namespace, cmd: str, **kw: Any) -> Any:
    from meshpipe_workers.control_client import request

    return request(_control_path(args), cmd, **kw)


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _emit(args: argparse.Namespace, data: Any, human: Callable[[Any], None]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        human(data)


# -- commands ------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    from meshpipe.identity import Identity

    ident = Identity.generate()
    ident.write(args.out)
    print(ident.sid)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from meshpipe.config import write_starter_config

    path, ident = write_starter_config(
        args.dir,
        listen=args.listen,
        peers=args.peer or [],
        name=args.name,
        discovery=args.discovery,
        tunnel=args.tunnel,
    )
    print(f"wrote {path}")
    print(f"sid:  {ident.sid}")
    print(f"ipv6: {ident.sid.ipv6()}")
    print(f"start the node with: meshpipe run -c {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from meshpipe import log
    from meshpipe.config import load_config
    from meshpipe.identity import Identity
    from meshpipe_workers.supervisor import Supervisor

    cfg = load_config(_config_path(args))
    identity = Identity.load(cfg.node.key)
    log.configure(node=identity.sid.short, role="supervisor", level=cfg.node.log_level)
    return Supervisor(cfg, _config_path(args), identity).run()


def cmd_reload(args: argparse.Namespace) -> int:
    """The node re-reads its config file; a file that does not validate is refused."""
    from meshpipe_workers.control_client import request
    from meshpipe_workers.reload import control_socket_of

    d = request(control_socket_of(_config_path(args)), "reload")

    def human(d: dict[str, Any]) -> None:
        print(f"reloading {d['file']}: {', '.join(d['live']) or 'no live changes'}")
        if d["restart_needed"]:
            print(f"needs a restart to change: {', '.join(d['restart_needed'])}")

    _emit(args, d, human)
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    # From the config and the key file: works without a running node.
    from meshpipe.config import load_config
    from meshpipe.identity import Identity

    cfg = load_config(_config_path(args))
    sid = Identity.load(cfg.node.key).sid
    info = {"sid": str(sid), "ipv6": str(sid.ipv6()), "name": cfg.node.name}
    _emit(args, info, lambda d: print(f"sid:  {d['sid']}\nipv6: {d['ipv6']}"))
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    found: list[dict[str, Any]] = _ask(args, "resolve", name=args.name)

    def human(rows: list[dict[str, Any]]) -> None:
        table = [
            [
                r["name"] or "-",
                r["sid"][:16],
                r["ipv6"],
                "-" if r["metric"] is None else str(r["metric"]),
            ]
            for r in rows
        ]
        _print_table(table, ["NAME", "SID", "IPV6", "METRIC"])
        if len(rows) > 1:
            print(f"{len(rows)} nodes claim this name; NAME.SIDPREFIX.mesh picks one")

    if not found:
        print(f"meshpipe: no node known as {args.name!r}", file=sys.stderr)
        if args.json:
            print("[]")
        return 1
    _emit(args, found, human)
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from meshpipe.topology import to_dot

    topo: dict[str, Any] = _ask(args, "topology")
    if args.dot:
        print(to_dot(topo), end="")
        return 0

    def human(t: dict[str, Any]) -> None:
        names = {n["sid"]: n["name"] or n["sid"][:8] for n in t["nodes"]}
        print(f"{len(t['nodes'])} nodes, {len(t['links'])} links")
        for lk in t["links"]:
            print(f"  {names[lk['a']]} -- {names[lk['b']]}  cost {lk['cost']}")

    _emit(args, topo, human)
    return 0


def _fmt_peers(peers: list[dict[str, Any]]) -> None:
    if not peers:
        print("no neighbours")
        return
    rows = [
        [
            p["sid"][:16],
            p["iface"],
            p["addr"],
            f"{p['rtt_ms']:.1f}",
            f"{100 * p['loss_in']:.0f}%",
            f"{100 * p['loss_out']:.0f}%",
            str(p["cost"]),
        ]
        for p in peers
    ]
    _print_table(rows, ["NEIGHBOUR", "IFACE", "ADDRESS", "RTT_MS", "LOSS_IN", "LOSS_OUT", "COST"])


def cmd_peers(args: argparse.Namespace) -> int:
    _emit(args, _ask(args, "peers"), _fmt_peers)
    return 0


def _fmt_routes(routes: list[dict[str, Any]]) -> None:
    if not routes:
        print("no routes")
        return
    rows = [[r["sid"][:16], r["next_hop"][:16], str(r["hops"]), str(r["metric"])] for r in routes]
    _print_table(rows, ["DESTINATION", "NEXT_HOP", "HOPS", "METRIC"])


def cmd_routes(args: argparse.Namespace) -> int:
    _emit(args, _ask(args, "routes"), _fmt_routes)
    return 0


def _fmt_status(s: dict[str, Any]) -> None:
    print(f"node      {s['sid']}")
    if s.get("name"):
        print(f"name      {s['name']}")
    print(f"ipv6      {s['ipv6']}")
    print(f"uptime    {s['uptime_s']} s")
    print(f"neighbours {s['neighbours']}, routes {s['routes']}")
    for w in s.get("supervisor", {}).get("workers", []):
        pss = w.get("pss_bytes")
        mem = f"  PSS {pss / (1 << 20):.1f} MB" if pss else ""
        print(f"worker    {w['role']:<24} pid {w['pid']}  restarts {w['restarts']}{mem}")
    drops = {k: v for k, v in s["counters"].items() if k.startswith("drop.")}
    if drops:
        print("drops     " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))


def cmd_status(args: argparse.Namespace) -> int:
    _emit(args, _ask(args, "status"), _fmt_status)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    from meshpipe_workers.control_client import request_stream

    summary: dict[str, Any] = {}
    for line in request_stream(
        _control_path(args),
        "ping",
        timeout=args.interval + 10,
        sid=args.sid,
        count=args.count,
        interval=args.interval,
        size=args.size,
        pattern=args.pattern,
    ):
        if line.get("start") and not args.json:
            print(f"PING {line['sid'][:16]}: {line['size']} data bytes, {line['hops']} hops")
        elif line.get("reply") and not args.json:
            print(
                f"reply from {args.sid[:16]}: seq={line['seq']} hops={line['hops']} "
                f"time={line['rtt_ms']:.2f} ms",
                flush=True,
            )
        elif line.get("done"):
            summary = line["result"]
            if line.get("error"):
                raise MeshpipeError(f"ping: {line['error']}")
    sent, received = summary.get("sent", 0), summary.get("received", 0)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        loss = 100.0 * (sent - received) / sent if sent else 0.0
        print(f"--- {summary.get('sid', args.sid)[:16]} ping statistics ---")
        print(f"{sent} sent, {received} received, {loss:.0f}% loss", end="")
        rtts = summary.get("rtt_ms", [])
        if rtts:
            avg = sum(rtts) / len(rtts)
            print(f", rtt min/avg/max = {min(rtts):.2f}/{avg:.2f}/{max(rtts):.2f} ms")
        else:
            print()
    return 0 if received else 1


def _fmt_trace(d: dict[str, Any]) -> None:
    rows = [
        [
            str(h["hop"]),
            (h["sid"] or "*")[:16],
            h["name"] or "-",
            f"{100 * (h['sent'] - h['received']) / h['sent']:.0f}%" if h["sent"] else "-",
            "*" if h["rtt_ms"] is None else f"{h['rtt_ms']:.2f}",
            "*" if h["rtt_avg_ms"] is None else f"{h['rtt_avg_ms']:.2f}",
        ]
        for h in d["hops"]
    ]
    _print_table(rows, ["HOP", "SID", "NAME", "LOSS", "BEST_MS", "AVG_MS"])


def cmd_trace(args: argparse.Namespace) -> int:
    from meshpipe_workers.control_client import request

    res = request(
        _control_path(args),
        "trace",
        timeout=args.rounds * 0.3 + 10,
        sid=args.target,
        rounds=args.rounds,
    )
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        _fmt_trace(res)
    hops = res["hops"]
    return 0 if hops and hops[-1]["sid"] == res["sid"] else 1


def _fmt_sessions(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no sessions")
        return
    table = [
        [
            r["peer"][:16],
            r["state"],
            "yes" if r["initiator"] else "no",
            f"{r['age_s']:.0f}",
            str(r["rekeys"]),
            str(r["tx_packets"]),
            str(r["rx_packets"]),
        ]
        for r in rows
    ]
    _print_table(table, ["PEER", "STATE", "INITIATOR", "AGE_S", "REKEYS", "TX_PKTS", "RX_PKTS"])


def cmd_sessions(args: argparse.Namespace) -> int:
    _emit(args, _ask(args, "sessions"), _fmt_sessions)
    return 0


def cmd_msp(args: argparse.Namespace) -> int:
    """netcat over MSP: stdin goes to the stream, the stream to stdout."""
    from meshpipe_workers.control_client import StreamReset, gap_reporter, open_pipe, run_pipe

    if args.msp_command == "connect":
        sock, info, pending = open_pipe(
            _control_path(args),
            "msp.connect",
            sid=args.sid,
            port=args.port,
            mode=args.mode,
            budget_ms=args.budget_ms,
        )
        if args.verbose:
            print(f"connected {info['mode']} stream {info['stream']}", file=sys.stderr, flush=True)
    else:
        allow = list(args.allow or [])
        sock, info, pending = open_pipe(
            _control_path(args), "msp.listen", port=args.port, allow=allow
        )
        if args.verbose:
            mode = info.get("mode", "reliable")
            print(f"accepted {mode} stream {info['stream']} from {info['sid']}", file=sys.stderr)
    on_gap = gap_reporter(sys.stdout.fileno(), sys.stderr, args.gap_fill == "zero")
    try:
        run_pipe(sock, pending, sys.stdin.fileno(), sys.stdout.fileno(), on_gap)
    except StreamReset as exc:
        print(f"meshpipe: msp {args.msp_command}: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close()
    return 0


def _fmt_streams(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no streams")
        return
    table = [
        [
            r["stream"],
            r["peer"][:16],
            str(r["port"]),
            r["mode"],
            r["state"],
            str(r["bytes_sent"]),
            str(r["bytes_received"]),
            f"{r['srtt_ms']:.1f}",
        ]
        for r in rows
    ]
    _print_table(table, ["STREAM", "PEER", "PORT", "MODE", "STATE", "SENT", "RECEIVED", "SRTT_MS"])


def cmd_streams(args: argparse.Namespace) -> int:
    _emit(args, _ask(args, "streams"), _fmt_streams)
    return 0


# -- services: expose, forward, socks, exit (workers/services.py does the work) ---------


def _fmt_services(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no services known")
        return
    table = [
        [
            r["name"],
            r["sid"][:16] + (" (this node)" if r["local"] else ""),
            str(r["port"]),
            r["kind"],
            str(r["hops"]),
            f"{r['age']:.0f}",
        ]
        for r in rows
    ]
    _print_table(table, ["NAME", "SID", "PORT", "KIND", "HOPS", "AGE_S"])


def cmd_services(args: argparse.Namespace) -> int:
    _emit(args, _ask(args, "services"), _fmt_services)
    return 0


def cmd_expose(args: argparse.Namespace) -> int:
    info = _ask(
        args,
        "expose",
        name=args.name,
        to=args.to,
        allow=args.allow or [],
        any=args.any,
        hidden=args.hidden,
        port=args.port,
        udp=args.udp,
    )
    allow = info["allow"]
    who = "any node" if allow == "any" else f"{len(allow)} node(s)" if allow else "nobody yet"
    proto = " (udp)" if info.get("protocol") == "udp" else ""
    _emit(
        args,
        info,
        lambda d: print(
            f"exposed {d['name']} -> {d['to']}{proto} on MSP port {d['port']}, open to {who}"
            + (" (hidden from discovery)" if d["hidden"] else "")
        ),
    )
    return 0


def cmd_unexpose(args: argparse.Namespace) -> int:
    _emit(args, _ask(args, "unexpose", name=args.name), lambda d: print(f"unexposed {d['name']}"))
    return 0


def _fmt_forward(d: dict[str, Any]) -> None:
    if d["kind"] == "socks":
        print(f"SOCKS5 on {d['listen']} via {d['sid'] or 'auto (a discovered exit)'}")
        return
    found = d.get("found")
    where = (
        f"{found['sid'][:16]} MSP port {found['port']}"
        if found
        else "not discovered yet (looked up on each connection)"
    )
    proto = f" (udp, {d['mode']})" if d["kind"] == "udp-forward" else ""
    print(f"forwarding {d['listen']} -> {d['service']}{proto}: {where}")


def cmd_forward(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    if args.udp:
        extra = {"udp": True, "mode": args.mode, "budget_ms": args.budget_ms}
    elif args.mode or args.budget_ms is not None:
        raise MeshpipeError("forward: --mode and --budget-ms are for --udp forwards")
    info = _ask(args, "forward", target=args.target, listen=args.listen, port=args.port, **extra)
    _emit(args, info, _fmt_forward)
    return 0


def _fmt_forwards(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no forwards")
        return
    table = [
        [
            r["kind"],
            r["listen"],
            r["service"] or "-",
            (r["sid"] or ("auto" if r["kind"] == "socks" else "discovery"))[:16],
            str(r["active"]),
            str(r["total"]),
            str(r["failed"]),
        ]
        for r in rows
    ]
    _print_table(table, ["KIND", "LISTEN", "SERVICE", "SID", "ACTIVE", "TOTAL", "FAILED"])


def cmd_forwards(args: argparse.Namespace) -> int:
    _emit(args, _ask(args, "forwards"), _fmt_forwards)
    return 0


def cmd_unforward(args: argparse.Namespace) -> int:
    info = _ask(args, "unforward", port=args.port)
    _emit(args, info, lambda d: print(f"stopped listening on {d['listen']}"))
    return 0


def cmd_socks(args: argparse.Namespace) -> int:
    _emit(args, _ask(args, "socks", listen=args.listen, via=args.via), _fmt_forward)
    return 0


def cmd_exit(args: argparse.Namespace) -> int:
    info = _ask(args, "exit", allow=args.allow or [], any=args.any, off=args.off)

    def human(d: dict[str, Any]) -> None:
        if d["allow"] is None:
            print("this node is no longer an exit")
        else:
            who = "any node" if d["allow"] == "any" else f"{len(d['allow'])} node(s)"
            print(f"exit on MSP port {d['port']}, open to {who}")

    _emit(args, info, human)
    return 0


# -- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshpipe", description="meshpipe mesh-overlay node")
    p.add_argument("--version", action="version", version=f"meshpipe {__version__}")
    # -c is accepted before the command too (meshpipe -c FILE msp listen 5000);
    # SUPPRESS keeps a later level's missing -c from erasing an earlier one.
    config_help = f"config file (default {DEFAULT_CONFIG}, or $MESHPIPE_CONFIG)"
    p.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
    sub = p.add_subparsers(dest="command", required=True)

    def node_cmd(
        name: str, fn: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
        sp.add_argument(
            "--json", action="store_true", help="machine-readable output (stable fields)"
        )
        sp.set_defaults(fn=fn)
        return sp

    sp = sub.add_parser("keygen", help="write a new node key file (mode 0600) and print its SID")
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=cmd_keygen)

    sp = sub.add_parser("init", help="write a key and a commented starter config into DIR")
    sp.add_argument("--dir", required=True)
    sp.add_argument("--listen", default="127.0.0.1:7700", help="UDP HOST:PORT to bind")
    sp.add_argument("--peer", action="append", help="static peer HOST:PORT (repeatable)")
    sp.add_argument("--name", help="human label for this node")
    sp.add_argument("--discovery", action="store_true", help="enable LAN multicast discovery")
    sp.add_argument("--tunnel", action="store_true", help="turn the IP tunnel (TUN device) on")
    sp.set_defaults(fn=cmd_init)

    sp = node_cmd("run", cmd_run, "run the node (supervisor and workers) in the foreground")
    node_cmd("status", cmd_status, "node summary, workers and counters")
    node_cmd("reload", cmd_reload, "re-read the config file and apply what changed (or refuse it)")
    node_cmd("peers", cmd_peers, "neighbours with link quality")
    node_cmd("routes", cmd_routes, "selected routes")
    node_cmd("id", cmd_id, "this node's SID and overlay IPv6 address (no running node needed)")
    node_cmd("sessions", cmd_sessions, "end-to-end encrypted sessions")
    sp = node_cmd("resolve", cmd_resolve, "SIDs and overlay addresses of every node claiming NAME")
    sp.add_argument("name", help="NAME, SIDPREFIX (16+ hex) or NAME.SIDPREFIX (.mesh optional)")
    sp = node_cmd("topology", cmd_topology, "the mesh as this node knows it: nodes and links")
    sp.add_argument("--dot", action="store_true", help="a Graphviz graph instead")
    sp = node_cmd("ping", cmd_ping, "MDP echo to a node: RTT per reply, loss, hop count")
    sp.add_argument("sid", help="destination SID or unique prefix (>= 8 hex characters)")
    sp.add_argument("--count", "-n", type=int, default=4)
    sp.add_argument("--interval", "-i", type=float, default=1.0)
    sp.add_argument("--size", "-s", type=int, default=0, help="payload bytes")
    sp.add_argument("--pattern", "-p", default="", help="hex bytes repeated as padding")
    sp = node_cmd("trace", cmd_trace, "every hop on the path to a node: SID, name, RTT")
    sp.add_argument("target", help="SID, unique SID prefix, or a name a trace has shown")
    sp.add_argument("--rounds", "-n", type=int, default=3, help="probes per hop")
    node_cmd("streams", cmd_streams, "open MSP streams")
    node_cmd("services", cmd_services, "services known by discovery (and this node's own)")
    sp = node_cmd("expose", cmd_expose, "offer a local TCP service to the mesh as NAME")
    sp.add_argument("name")
    sp.add_argument("--to", required=True, help="the local TCP (or UDP) target HOST:PORT")
    sp.add_argument("--udp", action="store_true", help="a UDP service (datagram/deadline)")
    sp.add_argument("--allow", action="append", help="a whole SID that may use it (repeatable)")
    sp.add_argument("--any", action="store_true", help="open to every node")
    sp.add_argument("--hidden", action="store_true", help="serve it but do not announce it")
    sp.add_argument("--port", type=int, help="MSP port (default: derived from the name)")
    sp = node_cmd("unexpose", cmd_unexpose, "stop offering a service (and withdraw it)")
    sp.add_argument("name")
    sp = node_cmd("forward", cmd_forward, "forward a local TCP port to a service NAME[@SID]")
    sp.add_argument("target", help="NAME, or NAME@SID (a SID or unique prefix)")
    sp.add_argument("--listen", required=True, help="local HOST:PORT to accept connections on")
    sp.add_argument("--port", type=int, help="the service's MSP port (for a hidden service)")
    sp.add_argument(
        "--udp", action="store_true", help="forward UDP datagrams (one flow each client)"
    )
    sp.add_argument(
        "--mode",
        choices=("datagram", "deadline"),
        default=None,
        help="--udp: datagram (default) or deadline (in order, late ones skipped)",
    )
    sp.add_argument("--budget-ms", type=int, default=None, help="--udp --mode deadline budget")
    node_cmd("forwards", cmd_forwards, "the node's forward and SOCKS listeners")
    sp = node_cmd("unforward", cmd_unforward, "stop a forward or SOCKS listener")
    sp.add_argument("port", type=int, help="its local TCP port")
    sp = node_cmd("socks", cmd_socks, "a local SOCKS5 endpoint that leaves the mesh at an exit")
    sp.add_argument("--listen", default="127.0.0.1:1080", help="local HOST:PORT")
    sp.add_argument("--via", default="auto", help="the exit's SID (or prefix), or auto")
    sp = node_cmd("exit", cmd_exit, "make this node a SOCKS5 exit for the given nodes")
    sp.add_argument("--allow", action="append", help="a whole SID that may use it (repeatable)")
    sp.add_argument("--any", action="store_true", help="open to every node")
    sp.add_argument("--off", action="store_true", help="stop being an exit")
    sp = node_cmd(
        "msp", cmd_msp, "netcat over an MSP stream (msp listen PORT / msp connect SID PORT)"
    )
    msp_sub = sp.add_subparsers(dest="msp_command", required=True)
    lp = msp_sub.add_parser("listen", help="accept one stream on PORT; pipe it to stdin/stdout")
    lp.add_argument("port", type=int)
    lp.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
    lp.add_argument("--allow", action="append", help="accept only this full SID (repeatable)")
    lp.add_argument("-v", "--verbose", action="store_true", help="say who connected (stderr)")
    cp = msp_sub.add_parser("connect", help="open a stream to SID PORT; pipe stdin/stdout")
    cp.add_argument("sid", help="destination SID or unique prefix (>= 8 hex characters)")
    cp.add_argument("port", type=int)
    cp.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
    cp.add_argument(
        "--mode",
        choices=("reliable", "deadline", "datagram"),
        default="reliable",
        help="reliable (default), deadline (late bytes are skipped) or datagram",
    )
    cp.add_argument(
        "--budget-ms",
        type=int,
        default=None,
        help="deadline mode: how late a byte may arrive (default 200)",
    )
    cp.add_argument("-v", "--verbose", action="store_true", help="say when it is open (stderr)")
    for sp_ in (lp, cp):
        sp_.add_argument(
            "--gap-fill",
            choices=("none", "zero"),
            default="none",
            help="deadline mode: write zeros for skipped bytes (keeps byte offsets)",
        )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.fn(args)
        return rc
    except MeshpipeError as exc:
        print(f"meshpipe: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
