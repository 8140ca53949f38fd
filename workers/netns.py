"""Network namespaces for the end-to-end tests and the demo, always torn down.

``line_topology(["a", "b", "c"], prefix)`` creates namespaces ``{prefix}-a`` ...,
links consecutive nodes with veth pairs and addresses them from 198.18.0.0/15 (the
range reserved for benchmarking; DESIGN.md, "Test network rules"): link k
(1-based) between ``names[k-1]`` and ``names[k]`` is 198.18.k.0/24, the left end
``.1`` and the right end ``.2``. Both veth ends are created directly inside their
namespaces, so nothing ever appears in the host's namespace. No address other
than 198.18.0.0/15 and loopback is configured.

Prefixes look like ``mp<digits>`` (e.g. ``"mp" + pid``). A process holds an
``flock`` on ``/run/meshpipe-tests/<prefix>.lock`` while it owns namespaces with
that prefix; the lock vanishes with the process. Namespaces named
``mp<digits>-<node>`` whose prefix lock nobody holds (and whose pid, if the
digits are one, is not a live process) are leftovers of a crashed run and are
removed, together with any processes still running inside them. Nothing outside
that name pattern is ever touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_DIR",
    "LOSS_DIRECTIONS",
    "UNDERLAY",
    "Link",
    "Topology",
    "cleanup_stale",
    "default_prefix",
    "line_topology",
    "list_namespaces",
]

UNDERLAY = ipaddress.IPv4Network("198.18.0.0/15")
PREFIX_RE = re.compile(r"^mp[0-9]+$")
NS_RE = re.compile(r"^(?P<prefix>mp[0-9]+)-(?P<node>[A-Za-z0-9_.-]+)$")
NODE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
LOCK_DIR = Path("/run/meshpipe-tests")
MAX_LINKS = 255
# The nftables table that holds a node's injected loss (see Topology.set_loss).
LOSS_TABLE = "meshpipe_loss"
# "out": what the node sends on the link (locally sent or forwarded; postrouting),
# "in": what it receives there (prerouting).
LOSS_DIRECTIONS = ("out", "in")
# Loss is drawn per packet as ``numgen random mod LOSS_SCALE < level``: 0.01 % steps.
LOSS_SCALE = 10_000
OFFLOADS = ("gso", "tso", "gro")

# Namespaces owned by live Topology objects of this process, and the prefix locks
# this process holds (prefix -> (fd, number of live topologies using it)).
_ACTIVE: set[str] = set()
_HELD: dict[str, tuple[int, int]] = {}


def default_prefix() -> str:
    """A namespace prefix unique to this process."""
    return f"mp{os.getpid()}"


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _underlay(addr: str) -> str:
    """``addr`` (with prefix length) after checking it lies in 198.18.0.0/15."""
    net = ipaddress.ip_interface(addr).network
    if not (isinstance(net, ipaddress.IPv4Network) and net.subnet_of(UNDERLAY)):
        raise ValueError(f"{addr} is outside the test underlay {UNDERLAY}")
    return addr


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_path(prefix: str) -> Path:
    return LOCK_DIR / f"{prefix}.lock"


def _try_lock(prefix: str) -> int | None:
    """An fd holding the prefix lock, or None if another process holds it."""
    LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(_lock_path(prefix), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _acquire(prefix: str) -> None:
    if prefix in _HELD:
        fd, refs = _HELD[prefix]
        _HELD[prefix] = (fd, refs + 1)
        return
    new_fd = _try_lock(prefix)
    if new_fd is None:
        raise RuntimeError(f"namespace prefix {prefix!r} is in use by another live process")
    _HELD[prefix] = (new_fd, 1)


def _release(prefix: str) -> None:
    fd, refs = _HELD[prefix]
    if refs > 1:
        _HELD[prefix] = (fd, refs - 1)
        return
    del _HELD[prefix]
    os.close(fd)  # releases the flock; the lock file stays (removing it would race)


def _kill_inside(ns: str) -> None:
    """SIGKILL every process still running inside namespace ``ns``."""
    res = _ip("netns", "pids", ns, check=False)
    pids = [int(p) for p in res.stdout.split() if p.isdigit()]
    for pid in pids:
        if pid == os.getpid():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if p != os.getpid() and _pid_alive(p) and not _is_zombie(p)]
        if pids:
            time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _delete_namespace(ns: str) -> None:
    if not NS_RE.match(ns):  # never touch anything outside our pattern
        raise ValueError(f"refusing to delete namespace {ns!r}: not a test namespace")
    _kill_inside(ns)
    _ip("netns", "del", ns)


def cleanup_stale() -> list[str]:
    """Delete namespaces left behind by crashed runs; returns their names.

    Only names matching ``mp<digits>-<node>`` are considered, and of those only
    ones whose prefix is not locked by a live process (see the module docstring).
    """
    removed: list[str] = []
    stale_locks: dict[str, int] = {}
    try:
        for ns in list_namespaces():
            m = NS_RE.match(ns)
            if m is None or ns in _ACTIVE:
                continue
            prefix = m["prefix"]
            if prefix not in _HELD and prefix not in stale_locks:
                pid = int(prefix[2:])
                if pid != os.getpid() and _pid_alive(pid):
                    continue  # a live process of that pid may own it
                fd = _try_lock(prefix)
                if fd is None:
                    continue  # a live run holds the prefix
                stale_locks[prefix] = fd
            _delete_namespace(ns)
            removed.append(ns)
    finally:
        for fd in stale_locks.values():
            os.close(fd)
    return removed


@dataclass(frozen=True)
class Link:
    """One veth pair: ``left`` and ``right`` nodes, same interface name at both ends."""

    index: int
    left: str
    right: str
    ifname: str
    left_addr: str  # with prefix length, e.g. "198.18.1.1/24"
    right_addr: str


@dataclass
class Topology:
    """Namespaces and links created by :func:`line_topology`."""

    prefix: str
    names: list[str]
    links: list[Link] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    # (node, ifname, direction) -> loss level out of LOSS_SCALE
    loss: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def ns(self, name: str) -> str:
        """The namespace name of node ``name``."""
        if name not in self.names:
            raise KeyError(f"no node {name!r} in this topology")
        return f"{self.prefix}-{name}"

    def addresses(self, name: str) -> list[str]:
        """The node's underlay IPv4 addresses (no prefix length), in link order."""
        self.ns(name)
        out: list[str] = []
        for link in self.links:
            if link.left == name:
                out.append(link.left_addr.split("/")[0])
            elif link.right == name:
                out.append(link.right_addr.split("/")[0])
        return out

    def address_towards(self, name: str, peer: str) -> str:
        """``name``'s address on its link to ``peer``."""
        for link in self.links:
            if (link.left, link.right) == (name, peer):
                return link.left_addr.split("/")[0]
            if (link.right, link.left) == (name, peer):
                return link.right_addr.split("/")[0]
        raise KeyError(f"no link between {name!r} and {peer!r}")

    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside node ``name``'s namespace."""
        return ["ip", "netns", "exec", self.ns(name), *argv]

    def exec(self, name: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside node ``name``; it is killed on teardown if still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(name, argv), **popen_kwargs)
        self.procs.append(proc)
        return proc

    def run(
        self, name: str, argv: Sequence[str], timeout: float = 60.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside node ``name`` to completion (output captured as text)."""
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.argv(name, argv), timeout=timeout, **kwargs)

    def links_of(self, name: str, peer: str | None = None) -> list[Link]:
        """The links of node ``name`` (only the one to ``peer`` if given)."""
        self.ns(name)
        found = [
            link
            for link in self.links
            if name in (link.left, link.right) and (peer is None or peer in (link.left, link.right))
        ]
        if peer is not None and not found:
            raise KeyError(f"no link between {name!r} and {peer!r}")
        return found

    # -- kernel loss and offloads -------------------------------------------------------

    def set_loss(
        self,
        name: str,
        percent: float,
        *,
        peer: str | None = None,
        directions: Sequence[str] = LOSS_DIRECTIONS,
    ) -> None:
        """Drop ``percent`` % of the packets on node ``name``'s links, at random.

        nftables ``numgen random`` rules in the node's namespace, one per link and
        direction ("out": sent on the link, "in": received on it); ``peer`` limits it
        to the link towards that node. 0 removes the rule. Calling again replaces
        the level. nftables sees a UDP GSO batch (or a TCP TSO/GRO segment) as one
        packet, so with offloads on one drop takes the whole batch; for per-frame
        loss call :meth:`disable_offloads` and run the nodes with UDP GSO off.
        """
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"loss percent must be within 0..100, got {percent!r}")
        for d in directions:
            if d not in LOSS_DIRECTIONS:
                raise ValueError(f"loss direction must be one of {LOSS_DIRECTIONS}, got {d!r}")
        level = round(percent * LOSS_SCALE / 100)
        for link in self.links_of(name, peer):
            for d in directions:
                key = (name, link.ifname, d)
                if level:
                    self.loss[key] = level
                else:
                    self.loss.pop(key, None)
        self._apply_loss(name)

    def clear_loss(self, name: str | None = None) -> None:
        """Remove all injected loss from node ``name`` (every node if None)."""
        for node in [name] if name is not None else self.names:
            self.ns(node)
            for key in [k for k in self.loss if k[0] == node]:
                del self.loss[key]
            self._apply_loss(node)

    def loss_drops(self, name: str) -> dict[tuple[str, str], int]:
        """Packets dropped so far on node ``name``: (ifname, direction) -> count."""
        res = self.run(name, ["nft", "-j", "list", "table", "inet", LOSS_TABLE], timeout=10)
        if res.returncode != 0:
            return {}
        drops: dict[tuple[str, str], int] = {}
        for item in json.loads(res.stdout).get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            ifname = direction = None
            packets = 0
            for expr in rule.get("expr", []):
                match = expr.get("match")
                if match is not None:
                    meta = match.get("left", {}).get("meta", {}).get("key")
                    if meta in ("oifname", "iifname"):
                        ifname = str(match.get("right"))
                        direction = "out" if meta == "oifname" else "in"
                if "counter" in expr:
                    packets = int(expr["counter"].get("packets", 0))
            if ifname is not None and direction is not None:
                drops[(ifname, direction)] = packets
        return drops

    def _apply_loss(self, name: str) -> None:
        """Rewrite node ``name``'s loss table from ``self.loss`` (one atomic nft run)."""
        rules: dict[str, list[str]] = {d: [] for d in LOSS_DIRECTIONS}
        for (node, ifname, d), level in sorted(self.loss.items()):
            if node == name:
                key = "oifname" if d == "out" else "iifname"
                draw = f"numgen random mod {LOSS_SCALE} < {level} " if level < LOSS_SCALE else ""
                rules[d].append(f'{key} "{ifname}" {draw}counter drop')
        # Creating the table first makes the delete valid when it does not exist yet.
        script = [f"table inet {LOSS_TABLE} {{}}", f"delete table inet {LOSS_TABLE}"]
        if any(rules.values()):
            script.append(f"table inet {LOSS_TABLE} {{")
            for d, hook in (("out", "postrouting"), ("in", "prerouting")):
                script.append(f"  chain {d} {{")
                script.append(f"    type filter hook {hook} priority 0; policy accept;")
                script.extend(f"    {rule}" for rule in rules[d])
                script.append("  }")
            script.append("}")
        res = self.run(name, ["nft", "-f", "-"], timeout=10, input="\n".join(script) + "\n")
        if res.returncode != 0:
            raise RuntimeError(f"nft in {self.ns(name)} failed: {res.stderr.strip()}")

    def disable_offloads(self, name: str | None = None) -> None:
        """``ethtool -K`` GSO, TSO and GRO off on the veths of ``name`` (every node if None).

        Without them the kernel (and nftables) handles every frame on its own, so
        loss rules drop single frames instead of whole batches.
        """
        for node in [name] if name is not None else self.names:
            for link in self.links_of(node):
                argv = ["ethtool", "-K", link.ifname]
                for feature in OFFLOADS:
                    argv += [feature, "off"]
                res = self.run(node, argv, timeout=10)
                if res.returncode != 0:
                    raise RuntimeError(f"ethtool in {self.ns(node)} failed: {res.stderr.strip()}")

    # -- construction and teardown ----------------------------------------------------

    def _add_namespace(self, name: str) -> None:
        ns = self.ns(name)
        if ns in _ACTIVE:
            raise RuntimeError(f"namespace {ns} is in use by another topology of this process")
        if ns in list_namespaces():  # leftover with our own (locked) prefix
            _delete_namespace(ns)
        _ip("netns", "add", ns)
        self.created.append(ns)
        _ACTIVE.add(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _add_link(self, index: int, left: str, right: str) -> None:
        link = Link(
            index=index,
            left=left,
            right=right,
            ifname=f"veth{index}",
            left_addr=_underlay(f"198.18.{index}.1/24"),
            right_addr=_underlay(f"198.18.{index}.2/24"),
        )
        lns, rns = self.ns(left), self.ns(right)
        _ip(
            "-n",
            lns,
            "link",
            "add",
            link.ifname,
            "type",
            "veth",
            "peer",
            "name",
            link.ifname,
            "netns",
            rns,
        )
        self.links.append(link)
        for ns, addr in ((lns, link.left_addr), (rns, link.right_addr)):
            _ip("-n", ns, "addr", "add", addr, "dev", link.ifname)
            _ip("-n", ns, "link", "set", link.ifname, "up")

    def close(self) -> None:
        """Stop started processes and delete every namespace created; raise if any remain."""
        for proc in self.procs:
            stop_process(proc)
        self.procs.clear()
        errors: list[str] = []
        for ns in reversed(self.created):
            try:
                _delete_namespace(ns)
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                errors.append(f"{ns}: {e}")
            _ACTIVE.discard(ns)
        self.created.clear()
        self.links.clear()
        if errors:
            raise RuntimeError("could not delete test namespaces: " + "; ".join(errors))


@contextlib.contextmanager
def line_topology(
    names: list[str],
    prefix: str | None = None,
    extra_links: Sequence[tuple[str, str]] = (),
) -> Iterator[Topology]:
    """Namespaces ``{prefix}-{name}`` linked in a line; all deleted on exit, even on error.

    ``extra_links`` adds veth pairs between further pairs of those nodes (e.g. the
    ends, for a triangle), numbered on after the line's links.
    """
    prefix = prefix or default_prefix()
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"prefix {prefix!r} must look like 'mp<digits>' (e.g. 'mp' + pid)")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"need distinct node names, got {names!r}")
    for name in names:
        if not NODE_RE.match(name) or len(f"{prefix}-{name}") > 64:
            raise ValueError(f"bad node name {name!r}")
    if len(names) - 1 + len(extra_links) > MAX_LINKS:
        raise ValueError(f"at most {MAX_LINKS} links")
    for left, right in extra_links:
        if left not in names or right not in names or left == right:
            raise ValueError(f"bad extra link {left!r} - {right!r}")

    _acquire(prefix)
    topo = Topology(prefix=prefix, names=list(names))
    try:
        cleanup_stale()
        for name in names:
            topo._add_namespace(name)
        for k in range(1, len(names)):
            topo._add_link(k, names[k - 1], names[k])
        for k, (left, right) in enumerate(extra_links, start=len(names)):
            topo._add_link(k, left, right)
    except BaseException as exc:
        try:
            topo.close()
        except Exception as close_exc:
            exc.add_note(f"tearing down the namespaces failed as well: {close_exc}")
        finally:
            _release(prefix)
        raise
    try:
        yield topo
    except BaseException as exc:
        # The test failed: still tear everything down, but report the test's error.
        try:
            topo.close()
        except Exception as close_exc:
            exc.add_note(f"tearing down the namespaces failed as well: {close_exc}")
        finally:
            _release(prefix)
        raise
    try:
        topo.close()
    finally:
        _release(prefix)
