"""`make demo`: four real meshpipe nodes in a line on this machine.

As root they live in network namespaces joined by veth pairs (198.18.0.0/15) and
find each other by LAN multicast; otherwise they share loopback and use configured
unicast peers. The demo prints what each node sees, then shows services: d exposes a
web server to a only, a finds it by discovery and fetches through a forward, b is
refused (and d logs it), a file crosses the 3 hops on an MSP stream, a trace
shows the path, and a deadline-mode stream keeps its budget through a lossy link
(workers/demo_media.py). Then names: a's DNS responder answers d.mesh, `meshpipe
resolve d`, and the mesh's topology from the node records (an SVG picture when
Graphviz's dot is installed).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from meshpipe_workers.demo_media import NODE_CONFIG, show_live_stream, show_trace
from meshpipe_workers.labnet import Lab

NAMES = ["a", "b", "c", "d"]


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


FETCH = """
import sys, urllib.request
try:
    print(len(urllib.request.urlopen(sys.argv[1], timeout=10).read()), "bytes")
except Exception as exc:
    print(f"failed: {exc}")
"""


def free_port() -> int:
    """A TCP port free on loopback (in namespaces every node has its own anyway)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_node(lab: Lab, name: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """A program in node ``name``'s namespace (or beside it, on loopback)."""
    if lab.topo is not None:
        return lab.topo.exec(name, argv, **kw)
    return subprocess.Popen(argv, **kw)


def fetch(lab: Lab, name: str, url: str) -> str:
    proc = in_node(lab, name, [sys.executable, "-c", FETCH, url], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=30)
    return out.decode().strip()


def show_services(lab: Lab, tmp: str) -> None:
    a_sid = lab.nodes["a"].sid
    www = Path(tmp) / "www"
    www.mkdir()
    page = b"hello from d\n" * 1000
    (www / "hello.txt").write_bytes(page)
    web_port, fwd_a, fwd_b = free_port(), free_port(), free_port()
    server = in_node(
        lab,
        "d",
        [sys.executable, "-m", "http.server", str(web_port), "-b", "127.0.0.1", "-d", str(www)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        banner("d exposes its web server as `web`, for a only")
        to = f"127.0.0.1:{web_port}"
        print(lab.cli_text("d", "expose", "web", "--to", to, "--allow", a_sid), end="")
        lab.wait_for(
            lambda: any(r["name"] == "web" for r in lab.cli("a", "services") or []),
            60,  # normally about a second; a record lost on the way returns by refresh
            "a to discover web",
        )
        banner("node a: services found by discovery")
        print(lab.cli_text("a", "services"), end="")
        banner("a forwards a local port to web and fetches hello.txt")
        print(lab.cli_text("a", "forward", "web", "--listen", f"127.0.0.1:{fwd_a}"), end="")
        got = fetch(lab, "a", f"http://127.0.0.1:{fwd_a}/hello.txt")
        print(f"  a: {got} (the file has {len(page)} bytes)")
        banner("b tries the same and is refused")
        print(lab.cli_text("b", "forward", "web", "--listen", f"127.0.0.1:{fwd_b}"), end="")
        print(f"  b: {fetch(lab, 'b', f'http://127.0.0.1:{fwd_b}/hello.txt')}")
        denied = [e for e in lab.log_events("d") if e.get("event") == "acl.denied"]
        for e in denied[-1:]:
            print(f"  d logged: {json.dumps({k: e[k] for k in ('event', 'sid', 'service')})}")
    finally:
        server.terminate()
        server.wait(10)


def show_stream(lab: Lab, tmp: str) -> None:
    banner("a file from a to d on one MSP stream, 3 hops (msp connect / msp listen)")
    src, dst = Path(tmp) / "poem.txt", Path(tmp) / "poem.out"
    src.write_bytes(b"".join(b"line %d of a small file\n" % i for i in range(2000)))
    node_d = lab.nodes["d"]
    with dst.open("wb") as out:
        listener = lab.popen("d", "msp", "listen", "5000", stdout=out, stdin=subprocess.DEVNULL)
        lab.wait_for(
            lambda: 5000 in [p["port"] for p in lab.cli("d", "status")["listening"]],
            10,
            "d's listener",
        )
        with src.open("rb") as stdin:
            sender = lab.popen("a", "msp", "connect", node_d.sid[:16], "5000", stdin=stdin)
            sender.wait(60)
        listener.wait(30)
    same = dst.read_bytes() == src.read_bytes()
    print(f"  {src.stat().st_size} bytes sent, {dst.stat().st_size} received, identical: {same}")


def enable_tunnel(lab: Lab) -> None:
    """a and d run the IP tunnel (TUN devices: only with root, in namespaces)."""
    for name in ("a", "d"):
        cfg = lab.nodes[name].config
        cfg.write_text(cfg.read_text() + '\n[tunnel]\nenabled = true\nname = "mesh0"\n')


def show_tunnel(lab: Lab, netns: bool) -> None:
    banner("the IP tunnel: ping -6 from a to d's overlay address, 3 hops")
    if not netns:
        print("  (needs root: TUN devices; the loopback demo leaves it out)")
        return
    d_ip = lab.cli("d", "id")["ipv6"]
    print(f"  a is {lab.cli('a', 'id')['ipv6']}, d is {d_ip} (derived from their SIDs)")

    def ping() -> str | None:
        argv = ["ping", "-6", "-c", "3", "-i", "0.3", "-W", "2", d_ip]
        proc = in_node(lab, "a", argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out, _ = proc.communicate(timeout=30)
        return out.decode() if proc.returncode == 0 else None

    output = lab.wait_for(ping, 30, "the tunnel")
    for line in (output or "").splitlines():
        if "bytes from" in line or "packet loss" in line or "rtt" in line:
            print(f"  {line}")


def enable_dns(lab: Lab) -> tuple[str, int]:
    """a answers DNS for the mesh zone (on loopback: its own namespace's, as root)."""
    addr = ("127.0.0.1", free_port())
    cfg = lab.nodes["a"].config
    cfg.write_text(cfg.read_text() + f'\n[dns]\nlisten = "{addr[0]}:{addr[1]}"\n')
    return addr


def dns_query(lab: Lab, addr: tuple[str, int], name: str) -> str:
    """Ask a's responder with dnspython, from inside a's namespace when there is one."""
    code = (
        "import sys, dns.message, dns.query\n"
        "q = dns.message.make_query(sys.argv[1], 'AAAA')\n"
        "r = dns.query.udp(q, sys.argv[2], port=int(sys.argv[3]), timeout=3)\n"
        "print(' '.join(rd.to_text() for rrset in r.answer for rd in rrset) or r.rcode())\n"
    )
    argv = [sys.executable, "-c", code, name, addr[0], str(addr[1])]
    proc = in_node(lab, "a", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=30)
    return out.decode().strip()


def show_names(lab: Lab, dns_addr: tuple[str, int]) -> None:
    banner("names: every node's name is in its signed node record")
    d_ip = lab.cli("d", "id")["ipv6"]
    lab.wait_for(lambda: lab.cli("a", "resolve", "d"), 30, "a to know d's name")
    print(lab.cli_text("a", "resolve", "d"), end="")
    answer = lab.wait_for(
        lambda: (got := dns_query(lab, dns_addr, "d.mesh")) == d_ip and got, 30, "d.mesh"
    )
    print(f"  DNS at a ({dns_addr[0]}:{dns_addr[1]}): d.mesh AAAA -> {answer}")
    banner("the mesh as a knows it (meshpipe topology)")
    lab.wait_for(
        lambda: len((lab.cli("a", "topology") or {}).get("links", [])) == len(NAMES) - 1,
        30,
        "a's topology",
    )
    print(lab.cli_text("a", "topology"), end="")
    if shutil.which("dot") is None:
        print("  (install graphviz for an SVG picture: meshpipe topology --dot | dot -Tsvg)")
        return
    svg = Path(tempfile.gettempdir()) / "meshpipe-demo-topology.svg"
    dot = lab.run("a", "topology", "--dot").stdout
    subprocess.run(["dot", "-Tsvg", "-o", str(svg)], input=dot, text=True, check=True)
    print(f"  picture: {svg} (meshpipe topology --dot | dot -Tsvg)")


def main() -> int:
    netns = os.geteuid() == 0
    with (
        tempfile.TemporaryDirectory(prefix="meshpipe-demo-") as tmp,
        Lab(NAMES, tmp, netns=netns, extra_config=NODE_CONFIG) as lab,
    ):
        where = (
            "network namespaces linked by veth (198.18.0.0/15), multicast discovery"
            if netns
            else "loopback UDP with configured peers (run as root for namespaces)"
        )
        banner(f"starting 4 nodes in a line a - b - c - d: {where}")
        if netns:
            enable_tunnel(lab)
        dns_addr = enable_dns(lab)
        lab.start_all()
        for name in NAMES:
            print(f"  {name}: {lab.nodes[name].sid}")
        banner("waiting until a has a route to d")
        lab.wait_for(lambda: lab.route("a", "d"), 60, "a's route to d")
        lab.wait_for(
            lambda: all(len(lab.cli(n, "routes") or []) == len(NAMES) - 1 for n in NAMES),
            60,
            "every node to reach every other",
        )
        for name in NAMES:
            banner(f"node {name}: neighbours")
            print(lab.cli_text(name, "peers"), end="")
            banner(f"node {name}: routes")
            print(lab.cli_text(name, "routes"), end="")
        r = lab.route("a", "d")
        assert r is not None
        banner("result")
        via, b_sid = r["next_hop"][:16], lab.nodes["b"].sid[:16]
        print(f"  a reaches d in {r['hops']} hops via {via} (b is {b_sid})")
        show_services(lab, tmp)
        show_stream(lab, tmp)
        show_trace(lab, banner)
        show_tunnel(lab, netns)
        show_live_stream(lab, banner)
        show_names(lab, dns_addr)
        banner("stopping")
    print("demo finished cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
