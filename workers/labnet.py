"""A small mesh of real `meshpipe run` processes on this machine.

Used by `make demo` and by the end-to-end tests. As root every node gets its own
network namespace, linked in a line by veth pairs addressed from 198.18.0.0/15
(with LAN multicast discovery on those links); without root the nodes share
loopback and find each other through configured unicast peers only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from meshpipe_workers.netns import Topology, default_prefix, line_topology

T = TypeVar("T")
BASE_PORT = 7700


@dataclass
class LabNode:
    name: str
    dir: Path
    config: Path
    sid: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)


def meshpipe_argv() -> list[str]:
    return [sys.executable, "-m", "meshpipe"]


class Lab:
    """Nodes named in ``names`` linked in a line: names[0] - names[1] - ... ."""

    def __init__(
        self,
        names: list[str],
        workdir: str | Path,
        netns: bool | None = None,
        prefix: str | None = None,
        base_port: int = BASE_PORT,
        timing: dict[str, float] | None = None,
        extra_config: str = "",
        node_config: dict[str, str] | None = None,
        udp_nodes: list[str] | None = None,
        extra_links: list[tuple[str, str]] | None = None,
    ) -> None:
        self.names = names
        self.workdir = Path(workdir)
        self.netns = (os.geteuid() == 0) if netns is None else netns
        self.prefix = prefix or default_prefix()
        self.base_port = base_port
        self.timing = timing or {
            "hello_interval": 0.5,
            "neighbour_timeout": 2.5,
            "update_interval": 2.0,
            "route_expiry": 7.0,
        }
        self.extra_config = extra_config  # raw TOML appended to every node's config
        # Raw TOML for one node (e.g. its radio [[interface]], see radio_channel.py).
        self.node_config = node_config or {}
        # The nodes that get a UDP interface (default: all); the others have only what
        # node_config gives them. Loopback: the UDP nodes are linked in a line in the
        # order of ``names``. Namespaces: a veth gets a UDP interface only when both
        # its ends are UDP nodes (the others stay unused, e.g. beside a radio).
        self.udp_nodes = udp_nodes
        # Namespaces only: veths beside the line's (e.g. [("a", "c")] closes a triangle).
        self.extra_links = extra_links or []
        self.nodes: dict[str, LabNode] = {}
        self.topo: Topology | None = None
        self._topo_cm: Any = None

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            if self.netns:
                self._topo_cm = line_topology(self.names, self.prefix, self.extra_links)
                self.topo = self._topo_cm.__enter__()
            for i, name in enumerate(self.names):
                self._configure(i, name)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for name in list(self.nodes):
            self.stop(name)
        if self._topo_cm is not None:
            self._topo_cm.__exit__(None, None, None)
            self._topo_cm = None

    def _configure(self, i: int, name: str) -> None:
        d = self.workdir / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        d.chmod(0o700)
        out = subprocess.run(
            [*meshpipe_argv(), "keygen", "--out", str(d / "node.key")],
            check=True,
            capture_output=True,
            text=True,
        )
        node = LabNode(
            name=name,
            dir=d,
            config=d / "meshpipe.toml",
            sid=out.stdout.strip(),
            log_path=d / "node.log",
        )
        node.config.write_text(self._config_text(i, name))
        self.nodes[name] = node

    def _config_text(self, i: int, name: str) -> str:
        lines = [
            "[node]",
            'key = "node.key"',
            'control_socket = "control.sock"',
            f'name = "{name}"',
            "",
            "[timing]",
            *(f"{k} = {v}" for k, v in self.timing.items()),
            "",
        ]
        if self.netns:
            assert self.topo is not None
            # One interface per veth; neighbours are found by multicast discovery.
            udp = self.udp_nodes
            links = [
                ln
                for ln in self.topo.links
                if name in (ln.left, ln.right)
                and (udp is None or (ln.left in udp and ln.right in udp))
            ]
            for j, link in enumerate(links):
                addr = (link.left_addr if link.left == name else link.right_addr).split("/")[0]
                lines += [
                    "[[interface]]",
                    f'name = "udp{j}"',
                    'kind = "udp"',
                    f'listen = "{addr}:{self.base_port}"',
                    "peers = []",
                    "discovery = true",
                    "",
                ]
        elif self.udp_nodes is None or name in self.udp_nodes:
            chain = [n for n in self.names if self.udp_nodes is None or n in self.udp_nodes]
            k = chain.index(name)
            peers = []
            if k + 1 < len(chain):
                peers.append(f'"127.0.0.1:{self.base_port + self.names.index(chain[k + 1])}"')
            lines += [
                "[[interface]]",
                'name = "udp0"',
                'kind = "udp"',
                f'listen = "127.0.0.1:{self.base_port + i}"',
                f"peers = [{', '.join(peers)}]",
                "discovery = false",
                "",
            ]
        return "\n".join(lines) + "\n" + self.extra_config + self.node_config.get(name, "")

    # -- processes -------------------------------------------------------------------

    def _wrap(self, name: str, argv: list[str]) -> list[str]:
        if self.netns:
            assert self.topo is not None
            return ["ip", "netns", "exec", self.topo.ns(name), *argv]
        return argv

    def start(self, name: str, wait: bool = True) -> None:
        node = self.nodes[name]
        logf = open(node.log_path, "ab")  # noqa: SIM115 - owned by the child's lifetime
        node.proc = subprocess.Popen(
            self._wrap(name, [*meshpipe_argv(), "run", "-c", str(node.config)]),
            stdout=logf,
            stderr=logf,
            stdin=subprocess.DEVNULL,
        )
        logf.close()
        if wait:
            self.wait_for(self._answers(name), 20, f"{name} to start")

    def start_all(self, timeout: float = 60) -> None:
        for name in self.names:
            self.start(name, wait=False)
        for name in self.names:
            self.wait_for(self._answers(name), timeout, f"{name} to start")

    def restart_all(self) -> None:
        """Stop every node and start them again (to pick up a changed config)."""
        for name in self.names:
            self.stop(name)
        self.start_all()

    def set_interface_key(self, key: str, toml_value: str) -> None:
        """Set ``key = toml_value`` in every [[interface]] of every node's config
        (replacing an earlier value); takes effect when the nodes (re)start."""
        for node in self.nodes.values():
            text = re.sub(rf"\n{re.escape(key)} = [^\n]*", "", node.config.read_text())
            node.config.write_text(
                text.replace('kind = "udp"\n', f'kind = "udp"\n{key} = {toml_value}\n')
            )

    def wait_routes(self, pairs: list[tuple[str, str]], hops: int, timeout: float = 40) -> None:
        """Wait until each (src, dst) has a route of ``hops`` hops."""
        for src, dst in pairs:

            def ready(s: str = src, d: str = dst) -> bool:
                r = self.route(s, d)
                return r is not None and r["hops"] == hops

            self.wait_for(ready, timeout, f"{src}'s route to {dst}")

    def counters(self, name: str) -> dict[str, int]:
        """The node's counters, with those of its interface workers added in."""
        st = self.cli(name, "status")
        if st is None:
            raise RuntimeError(f"{name} does not answer status")
        total = dict(st["counters"])
        for w in st["workers"]:
            if w.get("role") == "interface":
                for k, v in w["counters"].items():
                    total[k] = total.get(k, 0) + v
        return total

    def tunnel_iperf3(self, src: str, dst: str, seconds: int) -> float:
        """Mbit/s of iperf3 TCP from ``src`` to ``dst``'s overlay address (namespaces,
        [tunnel] on in both); 0.0 for a flow that never got going."""
        topo = self.topo
        assert topo is not None
        ident = self.cli(dst, "id")
        assert ident is not None
        addr = str(ident["ipv6"])
        self.wait_for(
            lambda: addr in topo.run(dst, ["ip", "-6", "addr", "show", "dev", "mesh0"]).stdout,
            20,
            f"{dst}'s TUN device",
        )
        server = topo.exec(dst, ["iperf3", "-s", "-1", "-B", addr], stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            res = topo.run(
                src, ["iperf3", "-c", addr, "-t", str(seconds), "-J"], timeout=seconds + 40
            )
            if res.returncode != 0:
                return 0.0
            out = json.loads(res.stdout)
            return float(out["end"]["sum_received"]["bits_per_second"]) / 1e6
        finally:
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(5)

    def _answers(self, name: str) -> Callable[[], bool]:
        # status needs the running node (id is answered from the files alone)
        return lambda: self.cli(name, "status") is not None

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        node = self.nodes[name]
        if node.proc is None:
            return
        if node.proc.poll() is None:
            node.proc.send_signal(sig)
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        node.proc = None

    def kill(self, name: str) -> None:
        """A node failure: SIGKILL the supervisor and every worker of the node."""
        for pid in self.node_pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node = self.nodes[name]
        if node.proc is not None:
            node.proc.kill()
            node.proc.wait()
            node.proc = None

    def node_pids(self, name: str) -> list[int]:
        st = self.cli(name, "status")
        if st is None:
            return []
        pids = [w["pid"] for w in st.get("supervisor", {}).get("workers", []) if w.get("pid")]
        sup = st.get("supervisor", {}).get("pid")
        return [*pids, *([sup] if sup else [])]

    def cli(self, name: str, *args: str) -> Any:
        """Run a CLI command with --json on a node; None when it fails."""
        node = self.nodes[name]
        res = subprocess.run(
            self._wrap(name, [*meshpipe_argv(), *args, "-c", str(node.config), "--json"]),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if res.returncode != 0:
            return None
        return json.loads(res.stdout)

    def popen(self, name: str, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
        """Start a CLI command on a node (``meshpipe -c CONFIG *args``) in the background."""
        node = self.nodes[name]
        argv = [*meshpipe_argv(), "-c", str(node.config), *args]
        return subprocess.Popen(self._wrap(name, argv), **kw)

    def run(self, name: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a CLI command on a node to its end (stdin empty), output captured."""
        node = self.nodes[name]
        argv = [*meshpipe_argv(), "-c", str(node.config), *args]
        return subprocess.run(
            self._wrap(name, argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli_text(self, name: str, *args: str) -> str:
        node = self.nodes[name]
        res = subprocess.run(
            self._wrap(name, [*meshpipe_argv(), *args, "-c", str(node.config)]),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return res.stdout + res.stderr

    def route(self, src: str, dst: str) -> dict[str, Any] | None:
        routes = self.cli(src, "routes") or []
        sid = self.nodes[dst].sid
        return next((r for r in routes if r["sid"] == sid), None)

    def log_events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.nodes[name].log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    @staticmethod
    def wait_for(fn: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
        deadline = time.monotonic() + timeout
        while True:
            val = fn()
            if val:
                return val
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)
