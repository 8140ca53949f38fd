"""A reliable MSP stream over the simulated 19,200 bit/s packet radio.

Mesh ``a`` -udp(loopback)- ``b`` -radio- ``c`` (no root needed: loopback UDP and
ptys only). ``msp connect`` on ``a`` sends 64 KB to ``msp listen`` on ``c``; the
bytes must arrive exact, and the goodput is printed beside the line rate. 64 KB is
some 480 radio-sized segments, well past slow start, in about a minute and a half.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshpipe_workers.labnet import Lab
from meshpipe_workers.radio_channel import RadioChannel, radio_interface_toml
from tests.netns import loopback_ports

RATE = 19_200
SIZE = 64 * 1000
PORT = 5100
STALL = 45.0  # seconds without a new byte at the reader: the stream is stuck


@dataclass
class Mesh:
    lab: Lab
    air: RadioChannel


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    port = loopback_ports()
    with RadioChannel(["b", "c"], RATE) as air:
        lab = Lab(
            ["a", "b", "c"],
            tmp_path_factory.mktemp("radio-msp"),
            netns=False,
            base_port=port,
            udp_nodes=["a", "b"],
            node_config={n: radio_interface_toml(air.path(n), RATE) for n in "bc"},
        )
        with lab:
            for name in lab.names:
                lab.start(name, wait=False)
            lab.wait_for(
                lambda: (r := lab.route("a", "c")) and r["hops"] == 2 and lab.route("c", "a"),
                30,
                "a's route to c over udp + radio",
            )
            yield Mesh(lab, air)


def _transfer(mesh: Mesh, tmp_path: Path, port: int, upstream: bool) -> None:
    """Move SIZE bytes between ``msp connect`` on a and ``msp listen`` on c: a -> c, or
    c -> a when ``upstream`` (the listener writes). Fails early when the bytes stall."""
    lab = mesh.lab
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(os.urandom(SIZE))
    into, out_of = (src.open("rb"), dst.open("wb"))
    c_io = {"stdin": into, "stdout": subprocess.DEVNULL} if upstream else {}
    a_io = {"stdin": subprocess.DEVNULL, "stdout": out_of} if upstream else {}
    c_io = c_io or {"stdin": subprocess.DEVNULL, "stdout": out_of}
    a_io = a_io or {"stdin": into, "stdout": subprocess.DEVNULL}
    listener = lab.popen("c", "msp", "listen", str(port), stderr=subprocess.PIPE, **c_io)
    lab.wait_for(
        lambda: any(s["port"] == port for s in lab.cli("c", "status")["listening"]),
        10,
        "the listener on c",
    )
    air0 = mesh.air.stats()
    t0 = time.monotonic()
    c_sid = lab.nodes["c"].sid[:16]
    sender = lab.popen("a", "msp", "connect", c_sid, str(port), stderr=subprocess.PIPE, **a_io)
    try:
        size, moved_at = 0, t0
        while (sender.poll() is None or listener.poll() is None) and size < SIZE:
            time.sleep(1.0)
            if dst.stat().st_size > size:
                size, moved_at = dst.stat().st_size, time.monotonic()
            if time.monotonic() - moved_at > STALL:
                counters = lab.cli("b", "status")["counters"]
                msp = {
                    n: {k: v for k, v in lab.cli(n, "status")["counters"].items() if "msp" in k}
                    for n in ("a", "c")
                }
                radio = [w["counters"] for w in lab.cli("b", "status")["workers"]]
                pytest.fail(
                    f"stalled at {size} of {SIZE} bytes after {time.monotonic() - t0:.0f} s; "
                    f"b drop.too_big={counters.get('drop.too_big', 0)}; msp {msp}; "
                    f"streams {lab.cli('a', 'streams')}; b workers {radio}"
                )
        assert sender.wait(60) == 0, sender.stderr.read() if sender.stderr else ""
        assert listener.wait(60) == 0, listener.stderr.read() if listener.stderr else ""
    finally:
        for proc in (sender, listener):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        into.close()
        out_of.close()
    took = time.monotonic() - t0
    air1 = mesh.air.stats()
    got = dst.read_bytes()
    assert len(got) == SIZE
    assert hashlib.sha256(got).digest() == hashlib.sha256(src.read_bytes()).digest()
    goodput = SIZE * 10 / took  # bit/s at 10 bits a byte, as the line counts
    air = {k: air1.get(k, 0) - air0.get(k, 0) for k in ("air.bytes", "air.frames")}
    print(
        f"\n{SIZE // 1000} KB {'c -> a' if upstream else 'a -> c'} over radio + udp: {took:.1f} s, "
        f"goodput {goodput:.0f} bit/s ({goodput / RATE:.0%} of {RATE} bit/s); air "
        f"{air['air.bytes']} bytes in {air['air.frames']} frames "
        f"({SIZE / max(1, air['air.bytes']):.0%} of it payload)"
    )
    closes = [
        e for e in lab.log_events("a" if upstream else "c") if e.get("event") == "stream.close"
    ]
    assert closes and closes[-1]["reason"] == "closed" and closes[-1]["bytes_in"] == SIZE


# a's first hop is a 1400-byte UDP link; routes carry the path MTU, so a cuts its
# segments for the radio behind b from the start (no drop.too_big at b).
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_64kb_stream_a_to_c_over_radio_byte_exact(mesh: Mesh, tmp_path: Path) -> None:
    _transfer(mesh, tmp_path, PORT, upstream=False)
