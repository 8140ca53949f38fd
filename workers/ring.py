"""Shared-memory ring queues between meshpipe's worker processes.

One :class:`Ring` carries variable-length byte records from exactly one producer
process to exactly one consumer process (single producer, single consumer). It
lives in a POSIX shared-memory segment (:class:`ShmSegment`) and comes
with a non-blocking eventfd for wake-ups, so a consumer can wait on the ring with
``select``/``selectors`` next to its sockets.

Layout of the segment (all integers little-endian)::

    0    u32 magic "MPRG", u32 layout version, u64 data capacity (bytes)
    64   u64 head   byte offset of the next record to read   (written by the consumer only)
    128  u64 tail   byte offset just past the last published record (producer only)
    256  data area, ``capacity`` bytes (a multiple of 8)

``head`` and ``tail`` are monotonically increasing byte counters (u64: they do not
wrap in the lifetime of a node); a counter's position in the data area is
``counter % capacity`` and ``tail - head`` is the number of bytes in use. Each on
its own cache line so the two sides do not share one.

A record is a u32 length followed by the bytes, padded to a multiple of 8. A
record that does not fit between its position and the end of the data area is
preceded by a skip marker (length ``0xFFFFFFFF``) meaning "continue at offset 0";
the marker is only written together with the record that follows it. A record may
be at most ``max_record`` bytes (a little under half the capacity), which
guarantees that an empty ring always accepts any record.

Publishing: the producer copies a whole batch of records into the free space and
then stores the new ``tail`` once; the consumer copies out up to ``max_records``
records and then stores the new ``head`` once. A reader therefore never sees a
half-written record, and a producer that dies in the middle of a batch leaves only
unpublished bytes behind, which the next producer overwrites. After publishing a
batch the producer adds 1 to the eventfd: one wake-up per batch, not per record.
A full ring never blocks: ``put_batch`` writes the prefix that fits and reports
how many records that was; the rest are the caller's drops (``dropped_full``).

Waiting: a consumer must call :meth:`Ring.drain_wakeup` *before* emptying the ring
with :meth:`Ring.get_batch` (until it returns ``[]``); since the producer publishes
before it signals, no batch can then be missed.

Restarts: the supervisor owns the segments and the eventfds (:meth:`Ring.create`)
and hands a :class:`RingSpec` plus the eventfd (``pass_fds``) to each worker, which
calls :meth:`Ring.attach`. ``head`` and ``tail`` live in the segment, so a worker
that was killed and restarted re-attaches to the same ring and continues:

* restarted producer: every batch its predecessor published is still there and is
  delivered; a batch it was in the middle of writing was never published and is
  lost (overwritten). If it died between publishing and signalling, the consumer
  only notices those records at its next wake-up or poll.
* restarted consumer: records its predecessor had already taken with
  ``get_batch`` are gone (``head`` had advanced), even if they were never
  processed; everything else is delivered in order, nothing twice. The
  predecessor may have drained the eventfd, so a new consumer should call
  ``get_batch`` once right after attaching instead of waiting for a wake-up.
* the old and the new process must never run at the same time (single producer,
  single consumer): the supervisor reaps the dead worker before restarting it.

Memory ordering: there are no explicit barriers (pure Python has none). This
relies on x86-64's TSO model, where stores become visible to other cores in
program order and loads are not reordered with older loads, together with
``head`` and ``tail`` being read and written as single aligned 8-byte moves:
they are ``ctypes.c_uint64`` objects laid over the segment (8-aligned offsets in
a page-aligned mapping), whose ``.value`` is one native load or store. Not
``struct.pack_into``: it zero-fills its target before writing the bytes, so a
reader in another process can see a transient 0 (measured: a few percent of
reads of a counter another process keeps storing to). So the consumer that sees a new ``tail``
also sees the record bytes written before it, and the producer that sees a new
``head`` sees the consumer finished reading the space before it. Weakly ordered
CPUs (ARM, MIPS) give no such guarantee; they would need real barriers (a small C
helper or atomics) before this layout is safe there.

The segment is a file in ``/dev/shm`` mapped with ``mmap`` (:class:`ShmSegment`),
not :class:`multiprocessing.shared_memory.SharedMemory`: on Python 3.11/3.12 that
class registers every segment it opens with the multiprocessing resource tracker,
which costs each worker an extra helper interpreter (about 10 MB) and unlinks the
ring when any attaching process exits. Here only the owner ever unlinks.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import secrets
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Self

__all__ = ["HEADER_SIZE", "Ring", "RingCorruptError", "RingSpec"]

MAGIC = 0x4752504D  # b"MPRG" little-endian
VERSION = 1
HEADER_SIZE = 256
MIN_CAPACITY = 64

_OFF_MAGIC = 0
_OFF_CAPACITY = 8
_OFF_HEAD = 64
_OFF_TAIL = 128
_SKIP = 0xFFFFFFFF
_ALIGN = 8
_PREFIX = 4

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MAGIC_VERSION = struct.Struct("<II")

SHM_DIR = "/dev/shm"


class ShmSegment:
    """A named POSIX shared-memory segment (a file in ``/dev/shm``) mapped read-write."""

    def __init__(self, name: str, *, create: bool, size: int = 0) -> None:
        if "/" in name or not name:
            raise ValueError(f"bad segment name {name!r}")
        self.name = name
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.size = os.fstat(fd).st_size
            if self.size == 0:
                raise ValueError(f"segment {name}: empty")
            self._map: mmap.mmap | None = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            if create:
                os.unlink(path)
            raise
        os.close(fd)  # the mapping keeps the pages; no descriptor to leak into children
        self.buf: memoryview | None = memoryview(self._map)

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()
            self.buf = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def unlink(self) -> None:
        os.unlink(os.path.join(SHM_DIR, self.name))


def _view(shm: ShmSegment) -> memoryview:
    buf = shm.buf
    if buf is None:  # only on a closed segment
        raise ValueError("shared memory segment is closed")
    return buf


def _load(buf: memoryview, offset: int) -> int:
    """Read a header field that nobody else writes concurrently (capacity, magic)."""
    value: int = _U64.unpack_from(buf, offset)[0]
    return value


class RingCorruptError(RuntimeError):
    """The ring's contents are inconsistent (a bug, or a second producer/consumer)."""


@dataclass(frozen=True)
class RingSpec:
    """What another process needs to attach to a ring.

    ``eventfd`` is a file descriptor number: it is only valid in a process that
    received it, e.g. through ``subprocess.Popen(..., pass_fds=[spec.eventfd])``
    (which keeps the number).
    """

    name: str
    size: int  # data area capacity in bytes
    eventfd: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> RingSpec:
        """Parse :meth:`to_json` output (or the dict it encodes, as nested in a larger JSON)."""
        obj: Any = json.loads(data) if isinstance(data, str | bytes) else data
        if not isinstance(obj, Mapping):
            raise ValueError(f"ring spec must be a JSON object, got {type(obj).__name__}")
        try:
            name, size, efd = obj["name"], obj["size"], obj["eventfd"]
        except KeyError as exc:
            raise ValueError(f"ring spec lacks {exc.args[0]!r}") from None
        if not isinstance(name, str) or not name:
            raise ValueError("ring spec: bad name")
        for key, val in (("size", size), ("eventfd", efd)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ValueError(f"ring spec: bad {key}")
        return cls(name=name, size=size, eventfd=efd)


def _check_eventfd(fd: int) -> None:
    try:
        os.fstat(fd)
    except OSError as exc:
        raise ValueError(
            f"ring eventfd {fd} is not open in this process (start the worker with pass_fds)"
        ) from exc
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return  # no /proc: cannot tell, trust the spec
    if target != "anon_inode:[eventfd]":
        raise ValueError(f"fd {fd} is {target!r}, not the ring's eventfd (missing pass_fds?)")


class Ring:
    """One end (or both) of a single-producer single-consumer shared-memory ring.

    Create with :meth:`create` (the owner) or :meth:`attach`; do not call the
    constructor directly. Counters (``records_put``, ``bytes_put``,
    ``dropped_full``, ``records_got``, ``bytes_got``) are kept per ``Ring`` object
    in this process; :meth:`depth` reads the shared state.
    """

    def __init__(self, shm: ShmSegment, spec: RingSpec, efd: int, *, owner: bool) -> None:
        self._shm = shm
        self._buf = _view(shm)
        # Shared with the other process: single native 8-byte loads and stores.
        self._head = ctypes.c_uint64.from_buffer(self._buf, _OFF_HEAD)
        self._tail = ctypes.c_uint64.from_buffer(self._buf, _OFF_TAIL)
        self._efd = efd
        self._closed = False
        self._unlinked = False
        self.spec = spec
        self.owner = owner
        self.capacity = spec.size
        self.max_record = ((spec.size // 2) & ~(_ALIGN - 1)) - _PREFIX
        self.records_put = 0
        self.bytes_put = 0
        self.dropped_full = 0
        self.records_got = 0
        self.bytes_got = 0

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def create(cls, size: int) -> Ring:
        """Create a new ring with ``size`` bytes of data area (rounded up to 8).

        The caller becomes the owner: it holds the eventfd to pass to workers and is
        the only one allowed to :meth:`unlink` the segment.
        """
        if size < MIN_CAPACITY:
            raise ValueError(f"ring size must be at least {MIN_CAPACITY} bytes")
        capacity = (size + _ALIGN - 1) & ~(_ALIGN - 1)
        while True:
            name = f"meshpipe-{os.getpid()}-{secrets.token_hex(6)}"
            try:
                shm = ShmSegment(name, create=True, size=HEADER_SIZE + capacity)
            except FileExistsError:
                continue
            break
        try:
            # A fresh segment is zero-filled: head = tail = 0.
            buf = _view(shm)
            _U64.pack_into(buf, _OFF_CAPACITY, capacity)
            _MAGIC_VERSION.pack_into(buf, _OFF_MAGIC, MAGIC, VERSION)
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        return cls(shm, RingSpec(name=name, size=capacity, eventfd=efd), efd, owner=True)

    @classmethod
    def attach(cls, spec: RingSpec) -> Ring:
        """Attach to an existing ring described by ``spec`` (in this or another process).

        The ring object gets its own duplicate of the eventfd (closed by
        :meth:`close`); the descriptor named in the spec stays open, so the
        process can attach again later.
        """
        _check_eventfd(spec.eventfd)
        shm = ShmSegment(spec.name, create=False)
        try:
            if shm.size < HEADER_SIZE + spec.size:
                raise ValueError(f"ring {spec.name}: segment smaller than its spec")
            buf = _view(shm)
            magic, version = _MAGIC_VERSION.unpack_from(buf, _OFF_MAGIC)
            capacity = _load(buf, _OFF_CAPACITY)
            if magic != MAGIC or version != VERSION:
                raise ValueError(f"ring {spec.name}: not a meshpipe ring (v{VERSION})")
            if capacity != spec.size:
                raise ValueError(f"ring {spec.name}: capacity {capacity} != spec {spec.size}")
            efd = os.dup(spec.eventfd)
        except BaseException:
            shm.close()
            raise
        return cls(shm, spec, efd, owner=False)

    def close(self) -> None:
        """Unmap the segment and close this object's eventfd. Idempotent."""
        if self._closed:
            return
        self._closed = True
        del self._head, self._tail  # ctypes views pin the mapping; drop them first
        self._shm.close()  # releases self._buf too (it is the segment's own view)
        os.close(self._efd)

    def unlink(self) -> None:
        """Remove the segment name (owner only); existing mappings stay valid."""
        if not self.owner:
            raise PermissionError("only the ring's owner may unlink it")
        if self._unlinked:
            return
        self._unlinked = True
        with contextlib.suppress(FileNotFoundError):  # removed behind our back
            self._shm.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self) -> str:
        role = "owner" if self.owner else "attached"
        return f"<Ring {self.spec.name} {role} capacity={self.capacity}>"

    # -- producer --------------------------------------------------------------------

    def put_batch(self, records: Sequence[bytes]) -> int:
        """Write the longest prefix of ``records`` that fits; publish it with one tail
        update and one wake-up. Returns how many records were written; never blocks.

        Raises ``ValueError`` (writing nothing) if a record exceeds ``max_record``.
        """
        if self._closed:
            raise ValueError(f"ring {self.spec.name} is closed")
        total = len(records)
        if total == 0:
            return 0
        if max(map(len, records)) > self.max_record:
            raise ValueError(f"record longer than the ring's max_record ({self.max_record})")
        buf = self._buf
        cap = self.capacity
        pack_u32 = _U32.pack_into
        head = self._head.value
        tail = self._tail.value
        free = cap - (tail - head)
        if free < 0 or free > cap:
            raise RingCorruptError(f"ring {self.spec.name}: head {head} tail {tail}")
        written = 0
        nbytes = 0
        for rec in records:
            length = len(rec)
            need = (_PREFIX + length + _ALIGN - 1) & ~(_ALIGN - 1)
            pos = tail % cap
            room = cap - pos
            if need > room:
                if room + need > free:
                    break
                pack_u32(buf, HEADER_SIZE + pos, _SKIP)
                tail += room
                free -= room
                pos = 0
            elif need > free:
                break
            start = HEADER_SIZE + pos
            pack_u32(buf, start, length)
            buf[start + _PREFIX : start + _PREFIX + length] = rec
            tail += need
            free -= need
            written += 1
            nbytes += length
        if written:
            self._tail.value = tail  # publish the batch
            self._wake()
            self.records_put += written
            self.bytes_put += nbytes
        self.dropped_full += total - written
        return written

    def put(self, record: bytes) -> bool:
        """Write one record (its own batch and wake-up); ``False`` if the ring is full."""
        return self.put_batch((record,)) == 1

    def _wake(self) -> None:
        # BlockingIOError: counter saturated, the consumer has wake-ups pending anyway.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self._efd, 1)

    # -- consumer --------------------------------------------------------------------

    def get_batch(self, max_records: int = 256) -> list[bytes]:
        """Take up to ``max_records`` published records (possibly none), in order,
        and release their space with one head update. Never blocks."""
        if self._closed:
            raise ValueError(f"ring {self.spec.name} is closed")
        buf = self._buf
        cap = self.capacity
        limit = self.max_record
        unpack_u32 = _U32.unpack_from
        head = self._head.value
        tail = self._tail.value
        if head > tail or tail - head > cap:
            raise RingCorruptError(f"ring {self.spec.name}: head {head} tail {tail}")
        out: list[bytes] = []
        nbytes = 0
        start_head = head
        while head < tail and len(out) < max_records:
            pos = head % cap
            (length,) = unpack_u32(buf, HEADER_SIZE + pos)
            if length == _SKIP:
                head += cap - pos
                continue
            need = (_PREFIX + length + _ALIGN - 1) & ~(_ALIGN - 1)
            if length > limit or pos + need > cap or head + need > tail:
                raise RingCorruptError(
                    f"ring {self.spec.name}: bad record length {length} at offset {head}"
                )
            start = HEADER_SIZE + pos + _PREFIX
            out.append(buf[start : start + length].tobytes())
            head += need
            nbytes += length
        if head != start_head:
            self._head.value = head  # release the space
            self.records_got += len(out)
            self.bytes_got += nbytes
        return out

    def drain(self) -> Iterator[list[bytes]]:
        """On a wake-up: reset the eventfd first (a batch published meanwhile wakes us
        again), then yield batches until the ring is empty."""
        self.drain_wakeup()
        while batch := self.get_batch():
            yield batch

    def consumer_fd(self) -> int:
        """The eventfd to wait on (readable when a batch was published since the last
        :meth:`drain_wakeup`)."""
        return self._efd

    def fileno(self) -> int:
        """Same as :meth:`consumer_fd`, so a ring can be registered with ``selectors``."""
        return self._efd

    def drain_wakeup(self) -> int:
        """Reset the eventfd; returns the number of batch signals since the last drain."""
        try:
            return os.eventfd_read(self._efd)
        except BlockingIOError:
            return 0

    # -- state -----------------------------------------------------------------------

    def depth(self) -> int:
        """Bytes in use (published but not yet taken, incl. prefixes, padding, skips)."""
        if self._closed:
            raise ValueError(f"ring {self.spec.name} is closed")
        head = self._head.value
        tail = self._tail.value
        return tail - head

    def counters(self) -> dict[str, int]:
        """This object's counters plus the current depth, for stats reports."""
        return {
            "records_put": self.records_put,
            "bytes_put": self.bytes_put,
            "dropped_full": self.dropped_full,
            "records_got": self.records_got,
            "bytes_got": self.bytes_got,
            "depth_bytes": self.depth(),
            "capacity": self.capacity,
        }
