"""Tests of the shared-memory SPSC ring (meshpipe_workers.ring)."""

from __future__ import annotations

import json
import os
import pickle
import select
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from collections import deque
from collections.abc import Iterator

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from meshpipe_workers.ring import HEADER_SIZE, Ring, RingSpec

MAX_FRAME = 65535


def rsize(length: int) -> int:
    """Bytes a record of ``length`` payload bytes takes: u32 prefix, padded to 8."""
    return (4 + length + 7) & ~7


def numbered(i: int, tag: bytes = b"") -> bytes:
    """Record ``i`` of a test stream: tag, u32 sequence number, 0..40 bytes of filler."""
    seq = i.to_bytes(4, "little")
    return tag + seq + (seq * 11)[: i % 41]


def seq_of(record: bytes, tag: bytes = b"") -> int:
    assert record.startswith(tag)
    i = int.from_bytes(record[len(tag) : len(tag) + 4], "little")
    assert record == numbered(i, tag), f"record {i} corrupted"
    return i


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring.create(1024)
    yield r
    r.close()
    r.unlink()


def shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


# -- child processes -----------------------------------------------------------------

CHILD_PRELUDE = """
import json, sys, time
from meshpipe_workers.ring import Ring, RingSpec

def numbered(i, tag=b""):
    seq = i.to_bytes(4, "little")
    return tag + seq + (seq * 11)[: i % 41]

def send_all(ring, records, batch):
    # Retry on a full ring (this test producer wants no drops); count published batches.
    i = batches = 0
    while i < len(records):
        n = ring.put_batch(records[i : i + batch])
        if n:
            batches += 1
            i += n
        else:
            time.sleep(0.0002)
    return batches

def stop_resource_tracker():
    # Make the tracker do its exit-time cleanup now, before this process exits,
    # so the parent can check its effect deterministically.
    from multiprocessing import resource_tracker
    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        stop()
"""


def spawn(body: str, spec: RingSpec, *args: str) -> subprocess.Popen[bytes]:
    """Run ``body`` in a fresh interpreter that received the ring's eventfd."""
    code = CHILD_PRELUDE + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", code, spec.to_json(), *args],
        pass_fds=(spec.eventfd,),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()
    return out.decode(), err.decode()


# -- spec ----------------------------------------------------------------------------


def test_spec_round_trips_through_json_and_pickle(ring: Ring) -> None:
    spec = ring.spec
    assert spec.size == ring.capacity == 1024
    assert RingSpec.from_json(spec.to_json()) == spec
    assert RingSpec.from_json(spec.to_json().encode()) == spec
    # nested in a larger JSON document, as the supervisor passes it
    nested = json.loads(json.dumps({"rx": json.loads(spec.to_json())}))
    assert RingSpec.from_json(nested["rx"]) == spec
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(ValueError):
        RingSpec.from_json('{"name": "x", "size": 64}')
    with pytest.raises(ValueError):
        RingSpec.from_json('{"name": "x", "size": -1, "eventfd": 3}')


def test_size_is_rounded_and_checked() -> None:
    with Ring.create(100) as r:
        assert r.capacity == 104
        assert r.max_record == 44  # padded record (48) <= capacity / 2
    with pytest.raises(ValueError):
        Ring.create(16)


def test_attach_checks_spec(ring: Ring) -> None:
    bad = RingSpec(ring.spec.name, ring.spec.size * 2, ring.spec.eventfd)
    with pytest.raises(ValueError):
        Ring.attach(bad)
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="eventfd"):
            Ring.attach(RingSpec(ring.spec.name, ring.spec.size, r))
    finally:
        os.close(r)
        os.close(w)


# -- single process ------------------------------------------------------------------


def test_put_get_round_trip_and_counters(ring: Ring) -> None:
    records = [b"", b"a", b"hello world", bytes(range(256)) + b"x" * 100]
    assert ring.get_batch() == []
    assert ring.put_batch(records) == 4
    assert ring.put(b"x")
    assert ring.records_put == 5
    assert ring.bytes_put == sum(map(len, records)) + 1
    assert ring.depth() == sum(rsize(len(r)) for r in records) + rsize(1)
    assert ring.get_batch(2) == records[:2]
    assert ring.get_batch() == [*records[2:], b"x"]
    assert ring.get_batch() == []
    assert ring.depth() == 0
    assert ring.records_got == 5
    assert ring.dropped_full == 0
    assert ring.put_batch([]) == 0


def test_zero_length_records(ring: Ring) -> None:
    assert ring.put_batch([b""] * 100) == 100
    assert ring.depth() == 800
    assert ring.get_batch(1000) == [b""] * 100


def test_wrap_around_uses_skip_marker() -> None:
    with Ring.create(64) as r:
        assert r.put_batch([b"a" * 12] * 3) == 3  # 3 x 16 bytes: tail at 48
        assert r.get_batch() == [b"a" * 12] * 3
        # 24 bytes needed, 16 left before the end: skip marker, record at offset 0
        assert r.put(b"b" * 20)
        assert r.depth() == 16 + 24
        assert r.get_batch() == [b"b" * 20]
        assert r.depth() == 0
        # and again across many laps
        for i in range(500):
            rec = bytes([i % 256]) * (i % (r.max_record + 1))
            assert r.put_batch([rec, rec[:3]]) == 2
            assert r.get_batch() == [rec, rec[:3]]


def test_one_wakeup_per_batch(ring: Ring) -> None:
    fd = ring.consumer_fd()
    assert select.select([fd], [], [], 0)[0] == []
    assert ring.put_batch([b"x"] * 10) == 10
    assert select.select([fd], [], [], 0)[0] == [fd]
    assert ring.drain_wakeup() == 1
    assert select.select([fd], [], [], 0)[0] == []
    assert ring.drain_wakeup() == 0
    ring.put_batch([b"y"] * 3)
    ring.put(b"z")
    assert ring.drain_wakeup() == 2
    ring.put_batch([])  # nothing published: no wake-up
    assert ring.drain_wakeup() == 0
    sel = selectors.DefaultSelector()
    sel.register(ring, selectors.EVENT_READ)  # a Ring has fileno()
    ring.put(b"w")
    assert len(sel.select(0)) == 1
    sel.close()


def test_full_ring_drops_are_counted_and_nothing_blocks() -> None:
    with Ring.create(256) as r:
        rec = b"r" * 20  # 24 bytes each: 10 fit in 256
        assert r.put_batch([rec] * 16) == 10
        assert r.dropped_full == 6
        r.drain_wakeup()
        start = time.monotonic()
        for _ in range(10_000):
            assert r.put_batch([rec] * 4) == 0
            assert not r.put(rec)
        assert time.monotonic() - start < 2.0
        assert r.dropped_full == 6 + 50_000
        assert r.drain_wakeup() == 0  # failed puts do not wake the consumer
        assert r.records_put == 10
        assert r.get_batch(3) == [rec] * 3
        assert r.put_batch([rec] * 5) == 3  # the freed space, in order
        assert r.dropped_full == 6 + 50_000 + 2
        assert r.get_batch(100) == [rec] * 10


def test_max_size_records() -> None:
    with Ring.create(200_000) as r:
        frames = [bytes([i]) * MAX_FRAME for i in range(7)]
        got: list[bytes] = []
        for i in range(0, 7, 2):  # several laps of a ring that holds three frames
            assert r.put_batch(frames[i : i + 2]) == len(frames[i : i + 2])
            got += r.get_batch()
        assert got == frames
        assert r.put_batch(frames[:4]) == 3
        assert r.dropped_full == 1
        assert r.get_batch() == frames[:3]
        big = b"\xab" * r.max_record
        assert r.put(big)
        assert r.get_batch() == [big]
        with pytest.raises(ValueError):
            r.put_batch([b"ok", big + b"!"])
        assert r.depth() == 0  # an oversized record rejects the whole batch


def test_empty_ring_accepts_a_max_record_at_any_position() -> None:
    with Ring.create(256) as r:
        big = b"M" * r.max_record
        for k in range(r.max_record + 1):
            assert r.put(b"s" * k)
            assert r.get_batch() == [b"s" * k]
            assert r.put(big), f"max record refused after a {k}-byte record"
            assert r.get_batch() == [big]


def test_unpublished_bytes_are_invisible_and_overwritten(ring: Ring) -> None:
    """What a producer killed in the middle of a batch leaves behind."""
    ring.put_batch([b"one", b"two"])
    # garbage in the whole free region, as a half-written batch would leave
    buf = ring._buf
    tail = 2 * rsize(3)
    buf[HEADER_SIZE + tail : HEADER_SIZE + ring.capacity] = b"\xff\x00\x13" * (
        (ring.capacity - tail) // 3
    ) + b"\xff" * ((ring.capacity - tail) % 3)
    assert ring.get_batch() == [b"one", b"two"]
    producer = Ring.attach(ring.spec)  # the restarted producer
    try:
        assert producer.put_batch([b"three", b""]) == 2
        assert ring.get_batch() == [b"three", b""]
    finally:
        producer.close()


def test_reattached_consumer_continues_without_loss_or_duplicates(ring: Ring) -> None:
    records = [numbered(i) for i in range(20)]
    assert ring.put_batch(records) == 20
    first = Ring.attach(ring.spec)
    assert first.get_batch(7) == records[:7]
    first.close()  # the consumer dies; records it took are gone
    second = Ring.attach(ring.spec)
    try:
        assert ring.put_batch([numbered(20)]) == 1
        assert second.get_batch() == [*records[7:], numbered(20)]
        assert second.depth() == 0
    finally:
        second.close()
    ring.put(b"still usable")
    assert ring.get_batch() == [b"still usable"]


def test_only_owner_unlinks_and_close_is_idempotent(ring: Ring) -> None:
    other = Ring.attach(ring.spec)
    with pytest.raises(PermissionError):
        other.unlink()
    other.close()
    other.close()
    assert shm_exists(ring.spec.name)
    with pytest.raises(ValueError):
        other.get_batch()


# -- model-based property test --------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.lists(st.binary(max_size=60), max_size=8)),
        st.tuples(st.just("get"), st.integers(min_value=1, max_value=8)),
    ),
    min_size=5,
    max_size=100,
)


@settings(max_examples=500, deadline=None)
@given(size=st.sampled_from([64, 72, 96, 128, 200, 256]), ops=OPS)
def test_matches_deque_model(size: int, ops: list[tuple[str, int | list[bytes]]]) -> None:
    ring = Ring.create(size)
    model: deque[bytes] = deque()
    written = dropped = stream_bytes = 0
    try:
        for kind, arg in ops:
            if isinstance(arg, list):
                assert kind == "put"
                batch = [rec[: ring.max_record] for rec in arg]
                was_empty = not model
                n = ring.put_batch(batch)
                assert 0 <= n <= len(batch)
                model.extend(batch[:n])
                written += n
                dropped += len(batch) - n
                stream_bytes += sum(rsize(len(r)) for r in batch[:n])
                if batch and was_empty:
                    assert n >= 1, "an empty ring must accept any record"
                if n < len(batch):
                    # refused only if it could not fit, even by wrapping
                    assert ring.capacity - ring.depth() < 2 * rsize(len(batch[n]))
            else:
                got = ring.get_batch(arg)
                assert got == [model.popleft() for _ in range(min(arg, len(model)))]
            used = sum(rsize(len(r)) for r in model)
            assert used <= ring.depth() <= used + ring.capacity // 2  # at most one skip
            if not model:
                assert ring.depth() == 0
        assert (ring.records_put, ring.dropped_full) == (written, dropped)
        event(f"laps around the ring: {min(stream_bytes // ring.capacity, 3)}")
        rest: list[bytes] = []
        while batch := ring.get_batch(3):
            rest += batch
        assert rest == list(model)
    finally:
        ring.close()
        ring.unlink()


# -- across processes ------------------------------------------------------------------


def test_cross_process_100k_records_with_select() -> None:
    total = 100_000
    with Ring.create(64 * 1024) as ring:
        child = spawn(
            """
            ring = Ring.attach(RingSpec.from_json(sys.argv[1]))
            total = int(sys.argv[2])
            batches = send_all(ring, [numbered(i) for i in range(total)], 64)
            print(json.dumps({"batches": batches, **ring.counters()}))
            ring.close()
            """,
            ring.spec,
            str(total),
        )
        sel = selectors.DefaultSelector()
        sel.register(ring.consumer_fd(), selectors.EVENT_READ)
        expected = 0
        wakeups = 0
        deadline = time.monotonic() + 30
        while expected < total:
            assert time.monotonic() < deadline, f"stalled at {expected}"
            if not sel.select(timeout=1.0):
                assert child.poll() is None or ring.depth() > 0, finish(child)
                continue
            wakeups += ring.drain_wakeup()  # drain first, then empty the ring
            while batch := ring.get_batch():
                for rec in batch:
                    assert seq_of(rec) == expected
                    expected += 1
        sel.close()
        out, err = finish(child)
        wakeups += ring.drain_wakeup()
        stats = json.loads(out)
        assert stats["records_put"] == total
        assert stats["dropped_full"] > 0  # the ring did fill up (the child retried)
        assert wakeups == stats["batches"]  # exactly one wake-up per published batch
        assert ring.get_batch() == []
        assert "leaked" not in err


def test_child_exit_does_not_destroy_ring() -> None:
    with Ring.create(4096) as ring:
        child = spawn(
            """
            ring = Ring.attach(RingSpec.from_json(sys.argv[1]))
            assert ring.put(b"from child")
            ring.close()
            stop_resource_tracker()
            """,
            ring.spec,
        )
        _, err = finish(child)
        assert "leaked" not in err
        assert shm_exists(ring.spec.name)
        assert ring.get_batch() == [b"from child"]
        # a later worker can still attach by name
        again = Ring.attach(ring.spec)
        assert again.put(b"later")
        again.close()
        assert ring.get_batch() == [b"later"]


def test_child_killed_does_not_destroy_ring() -> None:
    with Ring.create(4096) as ring:
        child = spawn(
            """
            ring = Ring.attach(RingSpec.from_json(sys.argv[1]))
            ring.put(b"ready")
            time.sleep(60)
            """,
            ring.spec,
        )
        deadline = time.monotonic() + 10
        while not (got := ring.get_batch()):
            assert time.monotonic() < deadline
            select.select([ring.consumer_fd()], [], [], 0.5)
        assert got == [b"ready"]
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=10)
        time.sleep(0.3)  # give an (unwanted) resource tracker time to clean up
        assert shm_exists(ring.spec.name)


def test_attach_starts_no_resource_tracker() -> None:
    """Attaching must not cost a worker the multiprocessing tracker's extra interpreter."""
    with Ring.create(4096) as ring:
        child = spawn(
            """
            from multiprocessing import resource_tracker
            ring = Ring.attach(RingSpec.from_json(sys.argv[1]))
            ring.put(b"x")
            ring.close()
            assert resource_tracker._resource_tracker._pid is None, "tracker started"
            """,
            ring.spec,
        )
        _, err = finish(child)
        assert child.returncode == 0, err
        assert ring.get_batch() == [b"x"]


def test_plain_sharedmemory_attach_would_destroy_ring() -> None:
    """Control for the tests above: they do detect the resource tracker's unlink."""
    with Ring.create(4096) as ring:
        child = spawn(
            """
            from multiprocessing.shared_memory import SharedMemory
            shm = SharedMemory(name=RingSpec.from_json(sys.argv[1]).name)
            shm.close()
            stop_resource_tracker()
            """,
            ring.spec,
        )
        child.communicate(timeout=10)
        assert not shm_exists(ring.spec.name)
        # the owner's unlink() on leaving the block tolerates the segment being gone


def test_restarted_producer_continues_after_kill() -> None:
    with Ring.create(16 * 1024) as ring:
        endless = """
            ring = Ring.attach(RingSpec.from_json(sys.argv[1]))
            i = 0
            while True:
                send_all(ring, [numbered(j, b"A") for j in range(i, i + 32)], 32)
                i += 32
            """
        first = spawn(endless, ring.spec)
        expected = 0
        deadline = time.monotonic() + 10
        while expected < 3000:  # consume while it writes, then kill it mid-stream
            assert time.monotonic() < deadline
            select.select([ring.consumer_fd()], [], [], 0.5)
            ring.drain_wakeup()
            for rec in ring.get_batch():
                assert seq_of(rec, b"A") == expected
                expected += 1
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
        ring.drain_wakeup()
        while batch := ring.get_batch():  # what it published before dying
            for rec in batch:
                assert seq_of(rec, b"A") == expected
                expected += 1
        second = spawn(
            """
            ring = Ring.attach(RingSpec.from_json(sys.argv[1]))
            send_all(ring, [numbered(j, b"B") for j in range(2000)], 50)
            ring.close()
            """,
            ring.spec,
        )
        got = 0
        deadline = time.monotonic() + 10
        while got < 2000:
            assert time.monotonic() < deadline
            select.select([ring.consumer_fd()], [], [], 0.5)
            ring.drain_wakeup()
            for rec in ring.get_batch():
                assert seq_of(rec, b"B") == got
                got += 1
        finish(second)
        assert ring.get_batch() == []
