"""A stand-in supervisor and worker for tests/test_zygote.py (run as a script).

As a script it forks a zygote (workers/zygote.py), as the supervisor does, and
exercises it: a worker's descriptors, name, parent and imports; a worker killed and
forked again from the same clean zygote; a dead zygote replaced. It prints one JSON
object. As a worker (``main``) it reports on itself into the pipe it was given.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _open_fds() -> list[int]:
    listed = [int(f) for f in os.listdir("/proc/self/fd")]  # the listing's own fd is shut now
    out = []
    for fd in listed:
        try:
            os.fstat(fd)
        except OSError:
            continue
        out.append(fd)
    return sorted(out)


def main(argv: list[str]) -> int:
    """The worker: report, dirty a preloaded module, then wait to be killed."""
    out, mode = int(argv[0]), argv[1]
    import meshpipe_workers.ring as ring

    report = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "fds": _open_fds(),
        "comm": Path("/proc/self/comm").read_text().strip(),
        "sighup_ignored": signal.getsignal(signal.SIGHUP) == signal.SIG_IGN,
        "frozen": gc.get_freeze_count(),
        "gc_enabled": gc.isenabled(),
        "dirty": hasattr(ring, "probe_dirty"),
        "control_imported": "meshpipe_workers.control" in sys.modules,
        "services_worker_imported": "meshpipe_workers.services" in sys.modules,
        "pyroute2_imported": "pyroute2" in sys.modules,
    }
    ring.probe_dirty = True  # type: ignore[attr-defined]
    os.write(out, (json.dumps(report) + "\n").encode())
    os.close(out)
    if mode == "exit":
        return 7
    while True:
        time.sleep(60)


def _read(r: int) -> dict[str, Any]:
    with os.fdopen(os.dup(r), "rb") as f:
        line = f.readline()
    return dict(json.loads(line))


def probe() -> dict[str, Any]:
    from meshpipe_workers.zygote import Zygote, reap_strangers

    zygote = Zygote.fork()
    res: dict[str, Any] = {"me": os.getpid(), "zygote": zygote.pid}
    r, w = os.pipe()
    target = 40  # not the number the pipe has here: the zygote must place it
    os.dup2(w, target)
    os.close(w)
    first = zygote.spawn("probe:0", "tests.zygote_probe", [str(target), "wait"], [target])
    res["first"] = _read(r)
    first.kill()
    res["first_code"] = first.wait(5)
    again = zygote.spawn("probe:0", "tests.zygote_probe", [str(target), "exit"], [target])
    res["again"] = _read(r)
    res["again_code"] = again.wait(5)
    os.kill(zygote.pid, signal.SIGKILL)
    time.sleep(0.2)
    res["zygote_alive_after_kill"] = zygote.alive()
    zygote.close()
    fresh = Zygote.start()
    res["fresh_zygote"] = fresh.pid
    third = fresh.spawn("probe:1", "tests.zygote_probe", [str(target), "exit"], [target])
    res["third"] = _read(r)
    res["third_code"] = third.wait(10)
    fresh.close()
    res["strangers"] = reap_strangers(set())
    return res


if __name__ == "__main__":
    print(json.dumps(probe()))
