"""A handshake flood with real processes in namespaces A - B - D.

A process in B's namespace (adjacent to D, not B's node) sends D thousands of junk
IK first messages a second, each under a fresh random source SID. Meanwhile a
restarted A must get a session with D within 10 s (D answers with a cookie routed to
A's SID, A retries with it), and D keeps serving an MSP stream from B.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpipe_workers.labnet import BASE_PORT, Lab
from tests.netns import require_root

pytestmark = pytest.mark.netns

RATE = 4000  # junk inits per second
FLOOD_SECONDS = 22.0

# argv: target address, port, target SID (hex), rate, seconds. Prints frames sent.
FLOODER = r"""
import os, socket, sys, time
from meshpipe import wire
from meshpipe.session import INIT_LEN, TYPE_INIT
host, port = sys.argv[1], int(sys.argv[2])
dst, rate, seconds = bytes.fromhex(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tick, sent = 0.01, 0
per_tick = max(1, round(rate * tick))
start = time.monotonic()
print("ready", flush=True)
while (now := time.monotonic()) < start + seconds:
    due = int((now - start) / tick) * per_tick
    while sent < due:
        init = bytes([TYPE_INIT]) + os.urandom(INIT_LEN - 1)
        frame = wire.encode_data(dst, os.urandom(32), init, 64)
        try:
            s.sendto(frame, (host, port))
        except OSError:
            pass
        sent += 1
    time.sleep(tick / 2)
print(sent, flush=True)
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    with Lab(["a", "b", "d"], tmp_path_factory.mktemp("flood"), netns=True) as lab:
        lab.start_all()
        lab.wait_for(lambda: (r := lab.route("a", "d")) and r["hops"] == 2, 30, "a's route to d")
        yield lab


def counters(lab: Lab, name: str) -> dict[str, int]:
    st = lab.cli(name, "status")
    return dict(st["counters"]) if st else {}


def test_restarted_node_gets_a_session_through_a_flood_and_streams_go_on(
    lab: Lab, tmp_path: Path
) -> None:
    d_sid = lab.nodes["d"].sid
    assert lab.topo is not None
    # An MSP stream B -> D, fed slowly for the whole test.
    out = tmp_path / "stream.bin"
    listener = lab.popen(
        "d",
        "msp",
        "listen",
        "5000",
        stdin=subprocess.DEVNULL,
        stdout=out.open("wb"),
        stderr=subprocess.PIPE,
    )
    lab.wait_for(
        lambda: any(s["port"] == 5000 for s in lab.cli("d", "status")["listening"]),
        10,
        "the listener",
    )
    sender = lab.popen(
        "b",
        "msp",
        "connect",
        d_sid,
        "5000",
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert sender.stdin is not None
    chunk = bytes(range(256)) * 40  # 10 kB
    stop = threading.Event()
    fed = [0]

    def feed() -> None:
        assert sender.stdin is not None
        while not stop.is_set():
            sender.stdin.write(chunk)
            sender.stdin.flush()
            fed[0] += len(chunk)
            time.sleep(0.05)
        sender.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    lab.wait_for(lambda: out.stat().st_size > 0, 15, "the stream's first bytes at d")

    # A had a session with D, then restarts (SIGKILL: it loses its keys).
    res = lab.cli("a", "ping", d_sid, "--count", "1")
    assert res is not None and res["received"] == 1
    lab.kill("a")

    flooder = lab.topo.exec(
        "b",
        [
            sys.executable,
            "-c",
            FLOODER,
            lab.topo.address_towards("d", "b"),
            str(BASE_PORT),
            d_sid,
            str(RATE),
            str(FLOOD_SECONDS),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert flooder.stdout is not None
    assert flooder.stdout.readline().strip() == "ready"
    flood_start = time.monotonic()
    lab.wait_for(
        lambda: counters(lab, "d").get("session.drop.cookie_required", 0) > 1000,
        10,
        "d under load",
    )
    size_at_flood = out.stat().st_size

    lab.start("a")
    lab.wait_for(lambda: lab.route("a", "d"), 20, "a's route to d after the restart")
    t0 = time.monotonic()
    took = None
    while time.monotonic() - t0 < 10.0:
        res = lab.cli("a", "ping", d_sid, "--count", "1")
        if res is not None and res["received"] == 1:
            took = time.monotonic() - t0
            break
    assert took is not None, "no session through the flood within 10 s"
    assert time.monotonic() - flood_start < FLOOD_SECONDS - 2  # it was still flooding
    ca, cd = counters(lab, "a"), counters(lab, "d")
    assert ca.get("session.handshake.cookie_rx", 0) >= 1, ca
    assert cd.get("session.handshake.cookie_ok", 0) >= 1

    # The stream kept flowing during the flood.
    time.sleep(max(0.0, flood_start + FLOOD_SECONDS - time.monotonic()))
    sent = int(flooder.communicate(timeout=20)[0].strip().splitlines()[-1])
    assert sent >= RATE * FLOOD_SECONDS * 0.7, sent
    grown = out.stat().st_size - size_at_flood
    assert grown > 1_000_000, grown  # 10 kB every 50 ms: ~4 MB in the flood's 20 s
    stop.set()
    feeder.join(10)
    assert sender.wait(60) == 0, sender.stderr.read() if sender.stderr else b""
    assert listener.wait(30) == 0
    data = out.read_bytes()
    assert len(data) == fed[0] and data == chunk * (fed[0] // len(chunk))

    cd = counters(lab, "d")
    print(
        f"\nflood: {sent} junk inits in {FLOOD_SECONDS:.0f} s; restarted A's ping after "
        f"{took:.2f} s; d: cookie_required={cd.get('session.drop.cookie_required')} "
        f"cookie_unroutable={cd.get('session.drop.cookie_unroutable')} "
        f"cookie_tx={cd.get('session.handshake.cookie_tx')} "
        f"cookie_ok={cd.get('session.handshake.cookie_ok')} "
        f"rate_limited={cd.get('session.drop.rate_limited', 0)}"
    )
    assert cd.get("session.drop.cookie_unroutable", 0) >= sent * 0.5
    st = lab.cli("d", "status")
    crypto = [w for w in st["workers"] if w["role"] == "crypto"]
    assert crypto and all(w["handshakes_in_progress"] <= 1024 for w in crypto)
    events = [e["event"] for e in lab.log_events("d")]
    # Rate-limited: once per 10 s per crypto worker at most.
    assert 1 <= events.count("session.under_load") <= 3 * len(crypto)
