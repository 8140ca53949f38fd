"""Services in the control worker: exposed TCP services, port forwards, SOCKS, the exit.

The control worker owns one :class:`Services`. It calls :meth:`Services.filter` with
every batch of MSP events before the StreamHub sees them (to drive the streams that
are still in a handshake of ours and to log ``acl.denied`` with the service's name),
:meth:`Services.on_timer` on every loop turn, and :meth:`Services.handle` for the
control requests in :data:`COMMANDS`.

- **expose**: each service listens on its MSP port with its access list; an accepted
  stream gets a non-blocking TCP connect to the target, then the two are bridged by
  the hub. A target that refuses or does not answer resets the stream (REFUSED).
- **forward**: a local TCP listener; each connection opens one stream to the node
  that offers the service (by discovery, or NAME@SID) and is bridged at once.
- **socks**: a local SOCKS5 listener; each CONNECT opens a stream to an exit's
  PROXY_PORT, sends the proxy_wire request and hands the exit's reply code to the
  client before bridging.
- **exit**: accepts proxy streams (access list), resolves names in a thread pool
  (never in the loop), applies the exit policy to the resolved addresses (loopback
  and the node's own addresses are refused by default; the control socket is a Unix
  socket, which a TCP CONNECT cannot name), connects, replies, bridges.

Log events: ``service.exposed``, ``service.unexposed``, ``service.target_failed``,
``forward.listen``, ``forward.open``, ``forward.no_service``, ``forward.closed``,
``socks.listen``, ``socks.connect``, ``exit.enabled``, ``exit.disabled``,
``proxy.connect`` (sid, host, port, result) and ``acl.denied`` (sid, service, port).
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import math
import selectors
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from meshpipe import log
from meshpipe.actions import Action
from meshpipe.config import Config, _auto_port, format_hostport, parse_hostport
from meshpipe.errors import MeshpipeError
from meshpipe.identity import resolve_sid
from meshpipe.msp import Mode, MspEvent, ResetCode, Stream, StreamClosed, StreamRefused
from meshpipe.services import proxy_wire, socks5
from meshpipe.services.acl import Acl
from meshpipe.services.choose import (
    PROXY_KIND,
    PROXY_NAME,
    PROXY_PORT,
    TargetError,
    connect_reply,
    parse_target,
    pick_exits,
    pick_service,
)
from meshpipe.services.exit_policy import ExitPolicy
from meshpipe.stack import NodeStack
from meshpipe_workers.exposed import Exposed
from meshpipe_workers.streams import StreamHub, StreamPipe, stream_mode
from meshpipe_workers.udp_services import UDP_KIND, UdpExposed, UdpServices

CONNECT_TIMEOUT = 10.0  # a TCP target that has not answered by then is unreachable
LOOKUP_WAIT = 3.0  # a forward connection waits this long for discovery to find its node
QUERY_EVERY = 1.0  # at most one discovery query a second for a missing service
REANNOUNCE_DELAY = 1.5  # after a new neighbour: time for it to hear our hellos first
DENY_MEMORY = 60.0  # socks --via auto tries an exit that denied us last, for this long
RESOLVER_THREADS = 4
BACKLOG = 128

COMMANDS = frozenset(
    {"expose", "unexpose", "forward", "unforward", "forwards", "socks", "exit", "services"}
)


class ServicesError(MeshpipeError):
    """A services request cannot be carried out (bad argument, name or port in use)."""


def _nodelay(sock: socket.socket) -> None:
    # Interactive traffic (a shell, a line protocol) must not wait for Nagle.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _send_small(sock: socket.socket, data: bytes) -> None:
    """A SOCKS handshake message (at most 22 bytes) into an idle socket's buffer."""
    try:
        sock.send(data)
    except OSError:
        pass


def _abort_tcp(sock: socket.socket) -> None:
    """Close with a TCP RST, so the client sees a failure and not a clean, empty end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


def _is_local(addr: str) -> bool:
    """True if ``addr`` is one of this host's addresses (binding to it works)."""
    ip = ipaddress.ip_address(addr)
    fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, 0))
        except OSError:
            return False
    return True


def _listen_socket(addr: tuple[str, int]) -> socket.socket:
    fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ServicesError(f"cannot listen on {format_hostport(addr)}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _acl_from(req: dict[str, Any]) -> Acl:
    if req.get("any"):
        if req.get("allow"):
            raise ServicesError("give either --any or --allow SIDs, not both")
        return Acl.any()
    allow = req.get("allow") or []
    if not isinstance(allow, list):
        raise ServicesError("allow must be a list of SIDs")
    return Acl.parse(allow) if allow else Acl()


# -- helpers with their own file descriptors ------------------------------------------------


class Resolver:
    """getaddrinfo in a few threads; results come back to the loop through a socketpair."""

    def __init__(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel
        self.pool = ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="resolver")
        self.rx, self.tx = socket.socketpair()
        self.rx.setblocking(False)
        self.tx.setblocking(False)
        self.done: collections.deque[tuple[Callable[[list[str]], None], list[str]]] = (
            collections.deque()
        )
        sel.register(self.rx, selectors.EVENT_READ, self._drain)

    def resolve(self, host: str, port: int, cb: Callable[[list[str]], None]) -> None:
        fut = self.pool.submit(_lookup, host, port)
        fut.add_done_callback(lambda f: self._finished(cb, f))

    def _finished(self, cb: Callable[[list[str]], None], fut: Future[list[str]]) -> None:
        # In a resolver thread: hand over (deque appends are atomic) and wake the loop.
        self.done.append((cb, fut.result() if not fut.cancelled() else []))
        try:
            self.tx.send(b"!")
        except OSError:
            pass  # the pipe is full: a wake-up is already pending

    def _drain(self) -> None:
        try:
            while self.rx.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self.done:
            cb, addrs = self.done.popleft()
            cb(addrs)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.sel.unregister(self.rx)
        self.rx.close()
        self.tx.close()


def _lookup(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    out: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in out:
            out.append(addr)
    return out


class Connector:
    """A non-blocking TCP connect, trying each address in turn before ``deadline``."""

    def __init__(
        self,
        owner: Services,
        addrs: list[tuple[str, int]],
        done: Callable[[socket.socket | None, int], None],
    ) -> None:
        self.owner = owner
        self.addrs = list(addrs)
        self.done = done
        self.sock: socket.socket | None = None
        self.deadline = owner.now() + CONNECT_TIMEOUT
        self.err = errno.EHOSTUNREACH
        owner.connecting.add(self)
        self._next()

    def _next(self) -> None:
        while self.addrs:
            host, port = self.addrs.pop(0)
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(fam, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex((host, port))
            if err in (0, errno.EINPROGRESS):
                self.sock = sock
                self.owner.sel.register(sock, selectors.EVENT_WRITE, self._ready)
                return
            sock.close()
            self.err = err
        self._finish(None, self.err)

    def _ready(self) -> None:
        sock = self.sock
        assert sock is not None
        self.owner.sel.unregister(sock)
        self.sock = None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            _nodelay(sock)
            self._finish(sock, 0)
            return
        sock.close()
        self.err = err
        self._next()

    def expire(self, now: float) -> None:
        if now >= self.deadline:
            self.cancel()
            self._finish(None, errno.ETIMEDOUT)

    def cancel(self) -> None:
        if self.sock is not None:
            self.owner.sel.unregister(self.sock)
            self.sock.close()
            self.sock = None
        self.owner.connecting.discard(self)

    def _finish(self, sock: socket.socket | None, err: int) -> None:
        self.owner.connecting.discard(self)
        self.done(sock, err)


# -- what the node offers and uses --------------------------------------------------------


def _check_sid_text(text: str) -> None:
    """A typed @SID / --via: a whole SID (64 hex characters) or a prefix of 8 or more."""
    t = text.strip().lower()
    if len(t) < 8 or len(t) > 64 or not all(c in "0123456789abcdef" for c in t):
        raise ServicesError(
            f"{text!r}: want a whole SID (64 hex characters) or a prefix of 8+ hex characters"
        )


@dataclass
class Listener:
    """A local TCP port of a forward (``kind`` "forward") or a SOCKS endpoint ("socks")."""

    kind: str
    sock: socket.socket
    listen: tuple[str, int]
    service: str | None = None  # forward: the service name
    sid: str | None = None  # forward: @SID as typed; socks: --via (None: auto)
    port: int | None = None  # forward: MSP port given with --port
    # The whole SID ``sid`` stands for: given whole, or the node a prefix first
    # resolved to. Fixed from then on, so a node that later makes up a key with the
    # same prefix cannot take the forward over.
    pinned: bytes | None = None
    active: int = 0
    total: int = 0
    failed: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "listen": format_hostport(self.listen),
            "service": self.service,
            "sid": self.sid,
            "pinned": None if self.pinned is None else self.pinned.hex(),
            "port": self.port,
            "active": self.active,
            "total": self.total,
            "failed": self.failed,
        }


@dataclass
class _Waiting:
    """A forward connection waiting for discovery to name the node."""

    conn: socket.socket
    listener: Listener
    until: float


@dataclass
class SocksConn:
    """One local SOCKS5 client, until its stream is bridged."""

    sock: socket.socket
    listener: Listener
    server: socks5.Socks5Server = field(default_factory=socks5.Socks5Server)
    request: socks5.ConnectRequest | None = None
    candidates: list[tuple[bytes, int]] = field(default_factory=list)
    stream: Stream | None = None
    buf: bytearray = field(default_factory=bytearray)
    early: bytearray = field(default_factory=bytearray)  # client bytes sent before the reply
    until: float = math.inf  # waiting for an exit to be discovered


@dataclass
class ExitConn:
    """One proxy stream at the exit, until it is bridged or answered."""

    stream: Stream
    buf: bytearray = field(default_factory=bytearray)
    request: proxy_wire.ProxyRequest | None = None
    connector: Connector | None = None
    done: bool = False


def _read_message(st: Stream, buf: bytearray) -> bool:
    """Read exactly one length-prefixed proxy_wire message into ``buf``; True when whole
    or when its length is already wrong (the decoder reports that). Bytes after it stay
    in the stream for the bridge."""
    while True:
        if len(buf) >= 2:
            n = int.from_bytes(buf[:2], "big")
            if n == 0 or n > proxy_wire.MAX_MESSAGE:
                return True
            need = 2 + n - len(buf)
            if need <= 0:
                return True
        else:
            need = 2 - len(buf)
        data = st.read(need)
        if not data:
            return False
        buf += data


class Services:
    def __init__(
        self,
        core: NodeStack,
        hub: StreamHub,
        sel: selectors.BaseSelector,
        cfg: Config,
        execute: Callable[[Iterable[Action]], None],
        clock: Callable[[], float],
        known_sids: Callable[[], set[bytes]],
    ) -> None:
        self.core = core
        self.hub = hub
        self.sel = sel
        self.cfg = cfg
        self.execute = execute
        self.now = clock
        self.known_sids = known_sids
        self.log = log.get()
        self.own = bytes(core.sid)
        self.exposed: dict[str, Exposed] = {}
        self.listeners: dict[int, Listener] = {}  # local TCP port -> listener
        self.watch: dict[Stream, Callable[[], None]] = {}  # streams in our handshakes
        self.connecting: set[Connector] = set()
        self.waiting: list[_Waiting] = []
        self.socks_waiting: list[SocksConn] = []
        self.denied_by: dict[bytes, float] = {}  # exit -> until
        self.last_query: dict[str | None, float] = {}
        self.exit_acl: Acl | None = None  # None: not an exit
        self.exit_policy_cfg = cfg.exit
        self.resolver = Resolver(sel)
        self._nb_count = 0
        self._nb_check = 0.0
        self._reannounce_at = math.inf
        self.udp = UdpServices(self)
        now = clock()
        for s in cfg.services:
            if s.kind == UDP_KIND:
                self.udp.expose((s.name, s.to, s.port, s.allow, s.hidden), now)
            else:
                self.expose(s.name, s.to, s.port, s.allow, s.hidden, now)
        if cfg.exit.enabled:
            self.enable_exit(cfg.exit.allow, now)

    # -- the control worker's hooks ----------------------------------------------------------

    def handle(self, cmd: str, req: dict[str, Any]) -> Any:
        now = self.now()
        if cmd == "services":
            return self.services(now)
        if cmd == "forwards":
            rows = [lst.as_json() for lst in self.listeners.values()]
            return rows + [f.as_json() for f in self.udp.forwards.values()]
        if cmd in ("expose", "forward") and req.get("udp"):
            return self._handle_udp(cmd, req, now)
        if cmd == "unexpose" and str(req.get("name", "")) in self.udp.exposed:
            return self.udp.unexpose(str(req.get("name", "")), now)
        if cmd == "unforward" and req.get("port") in self.udp.forwards:
            return self.udp.remove_forward(int(req["port"]))
        if cmd == "expose":
            to = _hostport(req.get("to"))
            port = req.get("port")
            if port is not None and (not isinstance(port, int) or not 1 <= port <= 65535):
                raise ServicesError(f"MSP port must be 1-65535, not {port!r}")
            name = str(req.get("name", ""))
            acl = _acl_from(req)
            return self.expose(name, to, port, acl, bool(req.get("hidden")), now).as_json()
        if cmd == "unexpose":
            return self.unexpose(str(req.get("name", "")), now)
        if cmd == "forward":
            return self.add_forward(req, now)
        if cmd == "socks":
            return self.add_socks(req)
        if cmd == "unforward":
            return self.remove_listener(req.get("port"))
        if cmd == "exit":
            if req.get("off"):
                return self.disable_exit(now)
            return self.enable_exit(_acl_from(req), now)
        raise ServicesError(f"unknown command {cmd!r}")

    def _handle_udp(self, cmd: str, req: dict[str, Any], now: float) -> Any:
        port = req.get("port")
        if port is not None and (not isinstance(port, int) or not 1 <= port <= 65535):
            raise ServicesError(f"MSP port must be 1-65535, not {port!r}")
        if cmd == "expose":
            to = _hostport(req.get("to"))
            name = str(req.get("name", ""))
            spec = (name, to, port, _acl_from(req), bool(req.get("hidden")))
            return self.udp.expose(spec, now).as_json()
        try:
            target = parse_target(str(req.get("target", "")))
        except TargetError as exc:
            raise ServicesError(str(exc)) from None
        if target.sid is not None and len(target.sid) < 8:
            raise ServicesError("a SID prefix needs at least 8 hex characters")
        mode, budget = stream_mode(req, Mode.DATAGRAM)
        listen = _hostport(req.get("listen"))
        return self.udp.add_forward(target.name, target.sid, listen, port, mode, budget, now)

    def filter(self, events: list[MspEvent]) -> list[MspEvent]:
        """Take the events of streams we are handshaking on; pass the rest to the hub."""
        out: list[MspEvent] = []
        for ev in self.udp.filter(events):
            if isinstance(ev, StreamRefused):
                name = self._port_name(ev.port)
                if name is not None and ev.code is ResetCode.DENIED:
                    self.log.info("acl.denied", sid=ev.peer.hex(), service=name, port=ev.port)
                    continue
                out.append(ev)
                continue
            cb = self.watch.get(ev.stream)
            if cb is not None:
                cb()
                if not isinstance(ev, StreamClosed):
                    continue  # the hub still logs the close
            out.append(ev)
        return out

    def next_deadline(self) -> float:
        t = self._reannounce_at
        if self.waiting or self.socks_waiting or self.connecting:
            t = min(t, self.now() + 0.1)
        return min(t, self._nb_check, self.udp.next_deadline())

    def on_timer(self, now: float) -> None:
        if now >= self._nb_check:
            self._nb_check = now + 0.5
            n = len(self.core.neighbours())
            if n > self._nb_count:
                self._reannounce_at = min(self._reannounce_at, now + REANNOUNCE_DELAY)
            self._nb_count = n
        if now >= self._reannounce_at:
            self._reannounce_at = math.inf
            self._reannounce(now)
        self.udp.on_timer(now)
        for c in list(self.connecting):
            c.expire(now)
        if self.waiting:
            self._retry_waiting(now)
        if self.socks_waiting:
            for sc in list(self.socks_waiting):
                self._socks_try_lookup(sc, now)

    def close(self) -> None:
        for lst in self.listeners.values():
            self.sel.unregister(lst.sock)
            lst.sock.close()
        self.listeners.clear()
        self.udp.close()
        self.resolver.close()

    # -- discovery ---------------------------------------------------------------------------

    def services(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "name": r["name"],
                "sid": r["sid"],
                "port": r["port"],
                "kind": r["kind"],
                "hops": r["hops"],
                "metric": r["metric"],
                "age": round(r["age"], 1),
                "expires": None if r["expires"] is None else round(r["expires"], 1),
                "local": r["hops"] == 0,
                "hidden": r["hidden"],
            }
            for r in self.core.services(now)
        ]

    def _announce(self, name: str, port: int, kind: str, hidden: bool, now: float) -> None:
        self.execute(self.core.announce_service(name, port, now, kind=kind, hidden=hidden))

    def _reannounce(self, now: float) -> None:
        # Our first announcements went out before any neighbour could accept them;
        # a new neighbour hears them now instead of at the next refresh.
        every: list[Exposed | UdpExposed] = [*self.exposed.values(), *self.udp.exposed.values()]
        for svc in every:
            if not svc.hidden:
                self._announce(svc.name, svc.port, svc.kind, False, now)
        if self.exit_acl is not None:
            self._announce(PROXY_NAME, PROXY_PORT, PROXY_KIND, False, now)

    def _query(self, name: str | None, now: float) -> None:
        if now - self.last_query.get(name, -math.inf) >= QUERY_EVERY:
            self.last_query[name] = now
            self.execute(self.core.query_services(now, name))

    def _port_name(self, port: int) -> str | None:
        if port == PROXY_PORT and self.exit_acl is not None:
            return PROXY_NAME
        every: list[Exposed | UdpExposed] = [*self.exposed.values(), *self.udp.exposed.values()]
        return next((s.name for s in every if s.port == port), None)

    # -- expose ------------------------------------------------------------------------------

    def claim(self, name: str, port: int | None) -> int:
        """The MSP port for a new service ``name`` (TCP or UDP): checked or derived."""
        if name in self.exposed or name in self.udp.exposed or name == PROXY_NAME:
            raise ServicesError(f"a service named {name!r} is already exposed")
        msp = self.core.msp
        if port is None:
            port = _auto_port(name, set(msp.listening()) | {PROXY_PORT})
        if msp.is_listening(port):
            raise ServicesError(f"MSP port {port} is already in use on this node")
        return port

    def expose(
        self,
        name: str,
        to: tuple[str, int],
        port: int | None,
        acl: Acl,
        hidden: bool,
        now: float,
    ) -> Exposed:
        port = self.claim(name, port)
        msp = self.core.msp
        svc = Exposed(name, to, port, acl, hidden)
        # The announcement is checked (name, size) before the port is taken.
        self._announce(name, port, svc.kind, hidden, now)
        msp.listen(port, allow=lambda sid: svc.acl.allows(sid))
        self.hub.acceptors[port] = lambda st: self._service_accepted(svc, st)
        self.exposed[name] = svc
        self.log.info("service.exposed", **svc.as_json())
        return svc

    def unexpose(self, name: str, now: float) -> dict[str, Any]:
        svc = self.exposed.pop(name, None)
        if svc is None:
            raise ServicesError(f"no exposed service named {name!r}")
        self.core.msp.unlisten(svc.port)
        self.hub.acceptors.pop(svc.port, None)
        self.execute(self.core.withdraw_service(name, now))
        self.log.info("service.unexposed", name=name, port=svc.port)
        return svc.as_json()

    def _service_accepted(self, svc: Exposed, st: Stream) -> None:
        def done(sock: socket.socket | None, err: int) -> None:
            now = self.now()
            if st.closed:  # the client gave up while we were connecting
                if sock is not None:
                    sock.close()
                return
            if sock is None:
                self.log.info(
                    "service.target_failed",
                    service=svc.name,
                    to=format_hostport(svc.to),
                    sid=st.peer.hex(),
                    error=errno.errorcode.get(err, str(err)),
                )
                st.reset(now, ResetCode.REFUSED)
                return
            self.hub.attach(sock, st)

        Connector(self, [svc.to], done)

    # -- forward -----------------------------------------------------------------------------

    def add_forward(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        try:
            target = parse_target(str(req.get("target", "")))
        except TargetError as exc:
            raise ServicesError(str(exc)) from None
        listen = _hostport(req.get("listen"))
        port = req.get("port")
        if port is not None and (not isinstance(port, int) or not 1 <= port <= 65535):
            raise ServicesError(f"MSP port must be 1-65535, not {port!r}")
        if target.sid is not None:
            _check_sid_text(target.sid)
        lst = self._add_listener(
            Listener("forward", _listen_socket(listen), listen, target.name, target.sid, port)
        )
        found = self._resolve_forward(lst, now)
        if found is None:
            self._query(target.name, now)
        info = lst.as_json()
        info["found"] = None if found is None else {"sid": found[0].hex(), "port": found[1]}
        self.log.info("forward.listen", **{k: info[k] for k in ("listen", "service", "sid")})
        return info

    def _add_listener(self, lst: Listener) -> Listener:
        local_port = lst.sock.getsockname()[1]
        lst.listen = (lst.listen[0], local_port)
        self.listeners[local_port] = lst
        self.sel.register(lst.sock, selectors.EVENT_READ, lambda: self._accept(lst))
        return lst

    def remove_listener(self, port: object) -> dict[str, Any]:
        if not isinstance(port, int):
            raise ServicesError(f"port must be a number, not {port!r}")
        lst = self.listeners.pop(port, None)
        if lst is None:
            raise ServicesError(f"no forward or socks listener on port {port}")
        self.sel.unregister(lst.sock)
        lst.sock.close()
        self.log.info("forward.closed", kind=lst.kind, listen=format_hostport(lst.listen))
        return lst.as_json()  # connections already open carry on

    def _accept(self, lst: Listener) -> None:
        now = self.now()
        for _ in range(BACKLOG):
            try:
                conn, _ = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(False)
            _nodelay(conn)
            lst.total += 1
            if lst.kind == "forward":
                self._forward_conn(conn, lst, now)
            else:
                self._socks_conn(conn, lst)

    def _pin(self, lst: Listener, now: float) -> bytes | None:
        """The whole SID of ``lst``'s @SID / --via: resolved once, then kept."""
        if lst.pinned is None and lst.sid is not None:
            try:
                lst.pinned = bytes(resolve_sid(lst.sid, self._all_known(now)))
            except MeshpipeError:
                return None
            self.log.info(
                "forward.pinned",
                kind=lst.kind,
                listen=format_hostport(lst.listen),
                sid=lst.pinned.hex(),
            )
        return lst.pinned

    def _resolve_forward(self, lst: Listener, now: float) -> tuple[bytes, int] | None:
        assert lst.service is not None
        rows = [r for r in self.core.services(now) if r["kind"] != UDP_KIND]
        sid: bytes | None = None
        if lst.sid is not None:
            sid = self._pin(lst, now)
            if sid is None:
                return None
            if lst.port is not None:
                return sid, lst.port
        return pick_service(rows, lst.service, sid, self.own)

    def find_service(
        self, rows: list[dict[str, Any]], name: str, sid_text: str | None, port: int | None
    ) -> tuple[bytes, int] | None:
        """(node, MSP port) for a forward to ``name`` (``@sid_text``, ``--port``)."""
        sid: bytes | None = None
        if sid_text is not None:
            known = self.known_sids() | {bytes.fromhex(r["sid"]) for r in rows}
            try:
                sid = bytes(resolve_sid(sid_text, known))
            except MeshpipeError:
                return None
            if port is not None:
                return sid, port
        return pick_service(rows, name, sid, self.own)

    def _forward_conn(self, conn: socket.socket, lst: Listener, now: float) -> None:
        found = self._resolve_forward(lst, now)
        if found is None:
            self._query(lst.service, now)
            self.waiting.append(_Waiting(conn, lst, now + LOOKUP_WAIT))
            return
        self._forward_open(conn, lst, found, now)

    def _retry_waiting(self, now: float) -> None:
        still: list[_Waiting] = []
        for w in self.waiting:
            found = self._resolve_forward(w.listener, now)
            if found is not None:
                self._forward_open(w.conn, w.listener, found, now)
            elif now >= w.until:
                w.listener.failed += 1
                self.log.info("forward.no_service", service=w.listener.service, sid=w.listener.sid)
                _abort_tcp(w.conn)
            else:
                still.append(w)
        self.waiting = still

    def _forward_open(
        self, conn: socket.socket, lst: Listener, found: tuple[bytes, int], now: float
    ) -> None:
        sid, port = found
        try:
            st = self.core.msp.open(sid, port, now)
        except MeshpipeError as exc:
            lst.failed += 1
            self.log.info("forward.failed", service=lst.service, error=str(exc))
            _abort_tcp(conn)
            return
        lst.active += 1
        self.log.info(
            "forward.open",
            listen=format_hostport(lst.listen),
            service=lst.service,
            sid=sid.hex(),
            port=port,
            stream=str(st.id),
        )

        def ended(_pipe: StreamPipe | None) -> None:
            lst.active -= 1

        self.hub.attach(conn, st, on_end=ended)

    # -- socks (the client side) ---------------------------------------------------------------

    def add_socks(self, req: dict[str, Any]) -> dict[str, Any]:
        listen = _hostport(req.get("listen"))
        via = req.get("via")
        if via in (None, "", "auto"):
            via = None
        elif not isinstance(via, str) or len(via) < 8:
            raise ServicesError("--via takes a SID (or a prefix of 8+ hex characters) or auto")
        else:
            _check_sid_text(via)
        lst = self._add_listener(Listener("socks", _listen_socket(listen), listen, sid=via))
        if via is None:
            self._query(PROXY_NAME, self.now())
        else:
            self._pin(lst, self.now())
        info = lst.as_json()
        self.log.info("socks.listen", listen=info["listen"], via=via or "auto")
        return info

    def _socks_conn(self, conn: socket.socket, lst: Listener) -> None:
        sc = SocksConn(conn, lst)
        lst.active += 1
        self.sel.register(conn, selectors.EVENT_READ, lambda: self._socks_read(sc))

    def _socks_read(self, sc: SocksConn) -> None:
        try:
            data = sc.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._socks_end(sc, None)
            return
        for ev in sc.server.feed(data):
            if isinstance(ev, socks5.Send):
                _send_small(sc.sock, ev.data)
            elif isinstance(ev, socks5.Close):
                self._socks_end(sc, None)
                return
            elif isinstance(ev, socks5.Connect):
                # Stop reading until the exit answers: early bytes wait in the client's
                # socket (backpressure) rather than here.
                self.sel.unregister(sc.sock)
                sc.request = ev.request
                self._socks_start(sc, self.now())

    def _socks_end(self, sc: SocksConn, reply: int | None) -> None:
        """Give up on a SOCKS client (with a reply code if it is waiting for one)."""
        if reply is not None:
            for ev in sc.server.reply(reply):
                if isinstance(ev, socks5.Send):
                    _send_small(sc.sock, ev.data)
        else:
            try:
                self.sel.unregister(sc.sock)
            except (KeyError, ValueError):
                pass
        sc.sock.close()
        sc.listener.active -= 1
        if reply not in (None, socks5.REP_SUCCEEDED):
            sc.listener.failed += 1

    def _socks_start(self, sc: SocksConn, now: float) -> None:
        if sc.listener.sid is not None:
            sid = self._pin(sc.listener, now)
            if sid is None:
                self._socks_end(sc, socks5.REP_NETWORK_UNREACHABLE)
                return
            sc.candidates = [(sid, PROXY_PORT)]
            self._socks_next(sc, now)
            return
        sc.until = now + LOOKUP_WAIT
        self.socks_waiting.append(sc)
        self._socks_try_lookup(sc, now)

    def _socks_try_lookup(self, sc: SocksConn, now: float) -> None:
        avoid = {s for s, until in self.denied_by.items() if until > now}
        exits = pick_exits(self.core.services(now), self.own, avoid)
        if exits:
            self.socks_waiting.remove(sc)
            sc.candidates = exits
            self._socks_next(sc, now)
        elif now >= sc.until:
            self.socks_waiting.remove(sc)
            self.log.info("socks.connect", sid=None, result="no_exit")
            self._socks_end(sc, socks5.REP_NETWORK_UNREACHABLE)
        else:
            self._query(PROXY_NAME, now)

    def _all_known(self, now: float) -> set[bytes]:
        return self.known_sids() | {bytes.fromhex(r["sid"]) for r in self.core.services(now)}

    def _socks_next(self, sc: SocksConn, now: float) -> None:
        assert sc.request is not None
        sid, port = sc.candidates.pop(0)
        try:
            st = self.core.msp.open(sid, port, now)
            st.write(proxy_wire.encode_request(sc.request.host, sc.request.port), now)
        except MeshpipeError as exc:
            self.log.info("socks.connect", sid=sid.hex(), result="error", error=str(exc))
            self._socks_end(sc, socks5.REP_GENERAL_FAILURE)
            return
        sc.stream = st
        sc.buf = bytearray()
        self.watch[st] = lambda: self._socks_stream(sc)

    def _socks_stream(self, sc: SocksConn) -> None:
        st = sc.stream
        assert st is not None and sc.request is not None
        now = self.now()
        try:
            whole = _read_message(st, sc.buf)
            got = proxy_wire.decode_response(bytes(sc.buf)) if whole else None
        except proxy_wire.ProxyWireError:
            got, whole = None, True
            st.reset(now, ResetCode.PROTOCOL)
        if got is None and not st.closed and not whole:
            return  # more to come
        del self.watch[st]
        req = sc.request
        if got is None:
            code = st.reset_code
            if code is ResetCode.DENIED:
                self.denied_by[st.peer] = now + DENY_MEMORY
            self.log.info(
                "socks.connect",
                sid=st.peer.hex(),
                host=req.host,
                port=req.port,
                result="stream_" + (code.name.lower() if code else "closed"),
            )
            if sc.candidates and code in (
                ResetCode.DENIED,
                ResetCode.REFUSED,
                ResetCode.UNREACHABLE,
                ResetCode.TIMEOUT,
            ):
                self._socks_next(sc, now)  # auto: the next exit
                return
            reply = (
                socks5.REP_NOT_ALLOWED
                if code is ResetCode.DENIED
                else socks5.REP_NETWORK_UNREACHABLE
                if code in (ResetCode.UNREACHABLE, ResetCode.TIMEOUT, ResetCode.REFUSED)
                else socks5.REP_GENERAL_FAILURE
            )
            self._socks_end(sc, reply)
            return
        status = got[0].status
        self.log.info(
            "socks.connect", sid=st.peer.hex(), host=req.host, port=req.port, result=status
        )
        if status != socks5.REP_SUCCEEDED:
            st.shutdown(now)
            self._socks_end(sc, status)
            return
        for ev in sc.server.reply(status):
            if isinstance(ev, socks5.Send):
                _send_small(sc.sock, ev.data)
            elif isinstance(ev, socks5.Data):
                st.write(ev.data, now)  # at most one recv's worth: within the send buffer
        lst = sc.listener

        def ended(_pipe: StreamPipe | None) -> None:
            lst.active -= 1

        self.hub.attach(sc.sock, st, on_end=ended)

    # -- exit ----------------------------------------------------------------------------------

    def enable_exit(self, acl: Acl, now: float) -> dict[str, Any]:
        msp = self.core.msp
        if self.exit_acl is None:
            if msp.is_listening(PROXY_PORT):
                raise ServicesError(f"MSP port {PROXY_PORT} is already in use on this node")
            self._announce(PROXY_NAME, PROXY_PORT, PROXY_KIND, False, now)
            msp.listen(PROXY_PORT, allow=self._exit_allows)
            self.hub.acceptors[PROXY_PORT] = self._exit_accepted
        self.exit_acl = acl  # a running exit just gets the new list
        info = {"port": PROXY_PORT, "allow": acl.as_config()}
        self.log.info("exit.enabled", **info)
        return info

    def disable_exit(self, now: float) -> dict[str, Any]:
        if self.exit_acl is None:
            raise ServicesError("this node is not an exit")
        self.exit_acl = None
        self.core.msp.unlisten(PROXY_PORT)
        self.hub.acceptors.pop(PROXY_PORT, None)
        self.execute(self.core.withdraw_service(PROXY_NAME, now))
        self.log.info("exit.disabled")
        return {"port": PROXY_PORT, "allow": None}

    def _exit_allows(self, sid: bytes) -> bool:
        return self.exit_acl is not None and self.exit_acl.allows(sid)

    def _exit_accepted(self, st: Stream) -> None:
        ec = ExitConn(st)
        self.watch[st] = lambda: self._exit_stream(ec)
        self._exit_stream(ec)  # the request may have come with the SYN

    def _exit_stream(self, ec: ExitConn) -> None:
        st = ec.stream
        if st.closed:
            self.watch.pop(st, None)
            if ec.connector is not None:
                ec.connector.cancel()
            ec.done = True
            return
        if ec.request is not None:
            return  # resolving or connecting; later bytes wait for the bridge
        try:
            if not _read_message(st, ec.buf):
                return
            got = proxy_wire.decode_request(bytes(ec.buf))
        except proxy_wire.ProxyWireError as exc:
            self._exit_log(ec, "bad_request", error=str(exc))
            self.watch.pop(st, None)
            st.reset(self.now(), ResetCode.PROTOCOL)
            return
        if got is None:
            return
        req = got[0]
        ec.request = req
        try:
            ipaddress.ip_address(req.host)
        except ValueError:
            self.resolver.resolve(req.host, req.port, lambda addrs: self._exit_resolved(ec, addrs))
            return
        self._exit_resolved(ec, [req.host])

    def _exit_resolved(self, ec: ExitConn, addrs: list[str]) -> None:
        if ec.done:
            return
        req = ec.request
        assert req is not None
        cfg = self.exit_policy_cfg
        own = [a for a in addrs if _is_local(a)]
        own += [i.listen[0] for i in self.cfg.interfaces if i.listen[0]]
        policy = ExitPolicy(cfg.allow_networks, cfg.deny_networks, cfg.allow_ports, own)
        ok, decision = policy.filter(addrs, req.port)
        if not decision.allowed:
            self._exit_reply(ec, decision.reply, decision.reason)
            return

        def connected(sock: socket.socket | None, err: int) -> None:
            ec.connector = None
            if ec.done:
                if sock is not None:
                    sock.close()
                return
            if sock is None:
                self._exit_reply(ec, connect_reply(err), errno.errorcode.get(err, str(err)))
                return
            self._exit_reply(ec, socks5.REP_SUCCEEDED, "connected", sock)

        ec.connector = Connector(self, [(str(a), req.port) for a in ok], connected)

    def _exit_reply(
        self, ec: ExitConn, code: int, result: str, sock: socket.socket | None = None
    ) -> None:
        st = ec.stream
        now = self.now()
        ec.done = True
        self.watch.pop(st, None)
        self._exit_log(ec, result, reply=code)
        st.write(proxy_wire.encode_response(code), now)
        if sock is None:
            st.shutdown(now)  # the refusal is all the client gets
            return
        self.hub.attach(sock, st)

    def _exit_log(self, ec: ExitConn, result: str, **kw: Any) -> None:
        req = ec.request
        self.log.info(
            "proxy.connect",
            sid=ec.stream.peer.hex(),
            host=None if req is None else req.host,
            port=None if req is None else req.port,
            result=result,
            **kw,
        )


def _hostport(value: object) -> tuple[str, int]:
    try:
        return parse_hostport(str(value or ""))
    except ValueError as exc:
        raise ServicesError(str(exc)) from None


__all__ = ["COMMANDS", "Connector", "Resolver", "Services", "ServicesError"]
