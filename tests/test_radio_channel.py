"""The simulated radio channel (workers.radio_channel): CSMA deferral, collisions
within the sensing delay, hidden nodes, and the per-kind air accounting."""

from __future__ import annotations

import os
import time

from meshpipe import wire
from meshpipe.link import kiss
from meshpipe_workers.radio_channel import RadioChannel, frame_class

RATE = 19_200


def _send(ch: RadioChannel, name: str, frames: list[bytes]) -> None:
    fd = os.open(ch.path(name), os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, b"".join(kiss.encode(kiss.encode_radio(0xFFFF, 1, f)) for f in frames))
    finally:
        os.close(fd)


def _wait_idle(ch: RadioChannel, frames: int, limit: float = 20.0) -> dict[str, int]:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        s = ch.stats()
        if s.get("air.frames", 0) >= frames:
            return s
        time.sleep(0.05)
    return ch.stats()


def test_stations_in_range_defer_to_each_other() -> None:
    body = wire.kind_byte(wire.KIND_HELLO) + bytes(60)
    with RadioChannel(["p", "q"], RATE, sense_delay=0.0) as ch:
        _send(ch, "p", [body] * 10)
        _send(ch, "q", [body] * 10)
        s = _wait_idle(ch, 20)
    assert s["air.frames"] == 20
    assert s.get("collided", 0) == 0  # no sensing delay: CSMA never collides
    assert s["air.bytes.hello"] == s["air.bytes"]


def test_hidden_stations_collide_at_the_one_between() -> None:
    body = wire.kind_byte(wire.KIND_DATA) + bytes(200)
    with RadioChannel(["a", "b", "c"], RATE, hidden=(("a", "c"),)) as ch:
        _send(ch, "a", [body] * 5)
        _send(ch, "c", [body] * 5)
        s = _wait_idle(ch, 10)
    assert s["air.frames"] == 10
    assert s.get("collided", 0) > 0  # at b: a and c cannot hear each other
    assert s.get("delivered", 0) + s.get("collided", 0) + s.get("drop.rx_full", 0) == 10


def test_frame_class_names_compressed_frames() -> None:
    hdr = kiss.encode_radio(1, 2, b"")
    assert frame_class(hdr + bytes([0x80, 0, 0])) == "compressed"
    assert frame_class(hdr + bytes([0xE1, 0, 0, 0, 0])) == "lc.control"
    assert frame_class(hdr + wire.kind_byte(wire.KIND_ROUTING)) == "routing"
