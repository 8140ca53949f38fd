"""Zygote: one clean process that has imported the shared core, and forks every worker.

Starting each worker as a fresh interpreter (``python -m ...``) costs every process its
own copy of the interpreter's heap and of every imported module (~14 MB of PSS each).
Instead the supervisor forks this zygote first thing (before any ring exists), the
zygote imports what the data-plane roles share (:data:`PRELOAD`), calls
``gc.freeze()`` so the collector never writes to those objects again (which would copy
their pages), and then only waits for requests. A worker forked from it shares those
pages copy-on-write; a restarted worker is forked from the same clean zygote, never
from a worker that ran.

Protocol (a SOCK_SEQPACKET pair, one request at a time): the supervisor sends a JSON
request ``{"role", "module", "argv", "fds"}`` with the descriptors the worker must
have attached (SCM_RIGHTS) and ``fds`` naming the numbers they must have in the
worker (the numbers its ring specs name); the answer is ``{"pid": N}`` or
``{"error": "..."}``. The zygote forks twice, so the worker is an orphan and is
re-parented to the supervisor (``PR_SET_CHILD_SUBREAPER``, :func:`become_subreaper`):
the supervisor waits for it and signals it as it would a child it started itself.

In the worker: only stdin (/dev/null), stdout, stderr and the named descriptors stay
open; SIGHUP is ignored until the worker installs its own handler (as before); the
process name (``comm``, what ``ps``/``top`` show) becomes ``mp-<role>``; then
``module.main(argv)`` runs, and its return value is the exit code. Each role imports
its own extras after the fork (the control worker's services, pyroute2 in the TUN
worker), so they are in no other worker.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import fcntl
import gc
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Any

from meshpipe.errors import MeshpipeError
from meshpipe_workers import reload

# The modules every data-plane worker (crypto, interface, radio) needs; with them the
# core (config, routing, sessions, MSP, msgpack, structlog, cryptography).
PRELOAD = ("meshpipe_workers.crypto", "meshpipe_workers.interface", "meshpipe_workers.radio")
MAX_REQUEST = 1 << 20
MAX_FDS = 256
PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


class ZygoteError(MeshpipeError):
    """The zygote is gone or could not fork a worker."""


def _prctl(option: int, arg: int | bytes) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(option, arg, 0, 0, 0)


def set_process_name(name: str) -> None:
    """``comm`` (at most 15 bytes): what ``ps -o comm``, ``top`` and journald show."""
    try:
        _prctl(PR_SET_NAME, name.encode()[:15])
    except OSError:
        pass


def become_subreaper() -> None:
    """Orphaned descendants (the workers the zygote forks) become our children."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


# -- the zygote's side --------------------------------------------------------------------


def _preload() -> None:
    gc.disable()
    for name in PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # everything so far is permanent: no gc writes to shared pages
    gc.enable()


def serve(sock: socket.socket) -> int:
    """Preload, freeze, and fork workers on request until the supervisor hangs up."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # The supervisor stops the workers itself and then closes the socket.
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    set_process_name("mp-zygote")
    _stdin_devnull()
    _preload()  # already done by Zygote.fork(); not by a fresh zygote
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
        except OSError:
            return 0
        if not data:
            return 0  # the supervisor is gone or stopping
        try:
            reply = _fork_worker(sock, json.loads(data), fds)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(json.dumps(reply).encode())


def _fork_worker(sock: socket.socket, req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    targets = [int(t) for t in req["fds"]]
    if len(targets) != len(fds):
        raise ValueError(f"{len(fds)} descriptors for {len(targets)} numbers")
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # the intermediate: fork the worker, say its pid, and leave
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _become_worker(sock, req, fds, targets)  # never returns
            os.write(w, str(pid).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read()
    os.waitpid(middle, 0)  # once it is reaped the worker is the supervisor's child
    if not text:
        raise OSError("the worker was not forked")
    return {"pid": int(text)}


def _become_worker(
    sock: socket.socket, req: dict[str, Any], fds: list[int], targets: list[int]
) -> None:
    code = 1
    try:
        sock.close()
        _place_fds(fds, targets)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        reload.ignore_sighup_in_child()
        _prctl(PR_SET_PDEATHSIG, 0)
        role = str(req["role"])
        set_process_name("mp-" + role)
        argv = [str(a) for a in req["argv"]]
        sys.argv = [str(req["module"]), *argv]
        module = importlib.import_module(str(req["module"]))
        code = int(module.main(argv) or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _place_fds(fds: list[int], targets: list[int], keep_also: tuple[int, ...] = ()) -> None:
    """Give the received descriptors their target numbers and close every other one
    but 0, 1, 2 and ``keep_also`` (what ``pass_fds`` did for a Popen'd worker)."""
    floor = max([2, *targets, *keep_also]) + 1  # copies above every target: no collision
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in fds]
    keep = {0, 1, 2, *targets, *keep_also}
    for src, dst in zip(high, targets, strict=True):
        os.dup2(src, dst, inheritable=True)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory listing's own descriptor


def _stdin_devnull() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    if fd != 0:
        os.dup2(fd, 0)
        os.close(fd)


# -- the supervisor's side ----------------------------------------------------------------


class Zygote:
    """The supervisor's handle: :meth:`spawn` a worker, :meth:`close` to end it."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid

    @classmethod
    def fork(cls) -> Zygote:
        """Fork the zygote from the calling process, which should hold little yet (the
        supervisor calls this before it makes a ring)."""
        become_subreaper()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The core is imported here, before the fork: the pages of what the zygote
        # imported after it would be copied by the supervisor's and the zygote's first
        # writes to each (refcounts, dicts), so the two would share almost nothing.
        # Frozen, the supervisor's collector (it keeps running) no longer writes to
        # these objects' headers either.
        _preload()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ours.close()
                _place_fds([], [], (theirs.fileno(),))
                code = serve(theirs)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        return cls(ours, pid)

    @classmethod
    def start(cls) -> Zygote:
        """A fresh zygote from a new interpreter (when the first one died: the
        supervisor is not a clean process to fork from any more)."""
        become_subreaper()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.set_inheritable(True)
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "meshpipe_workers.zygote", "--fd", str(theirs.fileno())],
            os.environ,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
        )
        theirs.close()
        return cls(ours, pid)

    def alive(self) -> bool:
        try:
            done, _status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return done == 0

    def spawn(self, role: str, module: str, argv: list[str], fds: list[int]) -> WorkerProc:
        """Fork a worker running ``module.main(argv)`` with ``fds`` at the same numbers."""
        req = json.dumps({"role": role, "module": module, "argv": argv, "fds": fds}).encode()
        try:
            socket.send_fds(self.sock, [req], fds)
            answer = self.sock.recv(MAX_REQUEST)
        except OSError as exc:
            raise ZygoteError(f"zygote: {exc}") from exc
        if not answer:
            raise ZygoteError("zygote: gone")
        reply = json.loads(answer)
        if "pid" not in reply:
            raise ZygoteError(f"zygote: {reply.get('error')}")
        return WorkerProc(int(reply["pid"]))

    def close(self) -> None:
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


class WorkerProc:
    """A worker the zygote forked, now our child: the part of ``subprocess.Popen``'s
    interface the supervisor uses (``poll``, ``wait``, signals)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1  # reaped elsewhere: gone all the same
                return self.returncode
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def reap_strangers(known: set[int]) -> int:
    """Reap exited children that are none of ``known`` (a subreaper inherits every
    orphan below it, e.g. a helper a worker started); how many were reaped."""
    n = 0
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return n
        if info is None or info.si_pid in known:
            return n  # a known one is reaped by its own poll()
        try:
            os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            pass
        n += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshpipe-zygote")
    p.add_argument("--fd", type=int, required=True, help="our end of the supervisor's pair")
    a = p.parse_args(argv)
    sock = socket.socket(fileno=a.fd)
    _place_fds([], [], (a.fd,))
    return serve(sock)


if __name__ == "__main__":
    sys.exit(main())
