"""Reticulum reference for bench/msp_goodput.py (runs with bench/.venv-rns's python).

    rns_xfer.py recv CONFIGDIR          # prints "dest <hash>", then one JSON line per file
    rns_xfer.py send CONFIGDIR HASH     # finds a path, prints "ready"; then for each file
                                        # path on stdin: a new RNS.Link, one RNS.Resource
    rns_xfer.py relay CONFIGDIR         # a transport node (enable_transport in its config)

Each process is one Reticulum instance with its own config directory, written by
bench/msp_goodput.py with only UDPInterfaces on the veth addresses (no AutoInterface
and no shared instance, so nothing touches the host's interfaces or loopback).

The receiver times from the first segment's advertisement (the first data it sees)
to the last segment's completion, then hashes the assembled file. Times are
CLOCK_MONOTONIC, comparable across processes on one machine.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from typing import Any

import RNS  # type: ignore[import-not-found, unused-ignore]

APP = "meshpipebench"
PATH_TIMEOUT = 90.0


def _start(configdir: str) -> Any:
    # loglevel 2 (errors and critical) keeps stdout for our own result lines.
    return RNS.Reticulum(configdir=configdir, loglevel=2)


def recv(configdir: str) -> int:
    _start(configdir)
    identity = RNS.Identity()
    dest = RNS.Destination(identity, RNS.Destination.IN, RNS.Destination.SINGLE, APP, "sink")
    lock = threading.Lock()
    t_first: dict[bytes, float] = {}

    def started(resource: Any) -> None:
        if resource.segment_index == 1:
            with lock:
                t_first[resource.original_hash] = time.monotonic()

    def concluded(resource: Any) -> None:
        t_end = time.monotonic()
        ok = resource.status == RNS.Resource.COMPLETE
        if not ok:
            # Late duplicate advertisements can start ghost segments that then time out;
            # a real failure shows at the sender, whose callback reports it.
            print(
                f"resource segment {resource.segment_index} ended with status {resource.status}",
                file=sys.stderr,
                flush=True,
            )
            return
        h = hashlib.sha256()
        got = 0
        if hasattr(resource.data, "read"):
            # The assembled file is deleted after this callback returns: hash it now.
            while chunk := resource.data.read(1 << 20):
                h.update(chunk)
                got += len(chunk)
        with lock:
            first = t_first.pop(resource.original_hash, t_end)
        result = {"bytes": got, "sha256": h.hexdigest(), "t_first": first, "t_end": t_end}
        print(json.dumps(result), flush=True)

    def link_up(link: Any) -> None:
        link.set_resource_strategy(RNS.Link.ACCEPT_ALL)
        link.set_resource_started_callback(started)
        link.set_resource_concluded_callback(concluded)

    dest.set_link_established_callback(link_up)
    dest.announce()
    print(f"dest {dest.hash.hex()}", flush=True)
    while True:
        time.sleep(3600)


def send(configdir: str, dest_hex: str) -> int:
    """One transfer per file path read from stdin, each on a fresh link; a JSON line each."""
    _start(configdir)
    dest_hash = bytes.fromhex(dest_hex)
    deadline = time.monotonic() + PATH_TIMEOUT
    while not RNS.Transport.has_path(dest_hash):
        if time.monotonic() > deadline:
            print(json.dumps({"error": "no path to the receiver"}), flush=True)
            return 1
        RNS.Transport.request_path(dest_hash)
        # Sparse requests, as Reticulum's own tools do: a burst would only be throttled.
        for _ in range(30):
            if RNS.Transport.has_path(dest_hash):
                break
            time.sleep(0.1)
    identity = RNS.Identity.recall(dest_hash)
    dest = RNS.Destination(identity, RNS.Destination.OUT, RNS.Destination.SINGLE, APP, "sink")
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(_send_one(dest, line.strip())), flush=True)
    return 0


def _send_one(dest: Any, path: str) -> dict[str, Any]:
    established = threading.Event()
    done = threading.Event()
    status: dict[str, Any] = {}
    # A fresh link per transfer, as TCP gets a fresh connection: no window learnt
    # by an earlier run carries over.
    link = RNS.Link(dest, established_callback=lambda _link: established.set())
    if not established.wait(PATH_TIMEOUT):
        return {"error": "link not established"}

    def finished(resource: Any) -> None:
        status["ok"] = resource.status == RNS.Resource.COMPLETE
        done.set()

    with open(path, "rb") as f:
        t_start = time.monotonic()
        # Random payload: compression would only burn CPU, so it is off.
        RNS.Resource(f, link, auto_compress=False, callback=finished)
        done.wait()
    link.teardown()
    return {"ok": status.get("ok", False), "t_start": t_start}


def relay(configdir: str) -> int:
    _start(configdir)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "recv":
        return recv(argv[1])
    if len(argv) == 3 and argv[0] == "send":
        return send(argv[1], argv[2])
    if len(argv) == 2 and argv[0] == "relay":
        return relay(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    RNS.exit(code)  # Reticulum's own threads would otherwise keep the process alive
