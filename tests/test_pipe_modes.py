"""The CLI end of a stream pipe: deadline gaps as stderr JSON lines, --gap-fill zero,
and the control requests' mode arguments."""

from __future__ import annotations

import io
import json
import os
import socket

import pytest

from meshpipe.errors import MeshpipeError
from meshpipe.msp import Mode
from meshpipe_workers.control_client import gap_reporter, run_pipe
from meshpipe_workers.streams import frame_chunk, frame_trailer, stream_mode


def _run(fill_zero: bool) -> tuple[bytes, list[dict[str, object]]]:
    node, cli = socket.socketpair()
    node.sendall(
        frame_chunk(b"abc")
        + frame_trailer({"gap": [3, 7]})
        + frame_chunk(b"hij")
        + frame_trailer({"eof": True})
        + frame_trailer({"closed": True})
    )
    stdin_r, stdin_w = os.pipe()
    os.close(stdin_w)
    out_r, out_w = os.pipe()
    err = io.StringIO()
    try:
        run_pipe(cli, b"", stdin_r, out_w, gap_reporter(out_w, err, fill_zero))
    finally:
        os.close(out_w)
        os.close(stdin_r)
        node.close()
        cli.close()
    with os.fdopen(out_r, "rb") as f:
        data = f.read()
    return data, [json.loads(line) for line in err.getvalue().splitlines()]


def test_gap_is_a_json_line_on_stderr() -> None:
    data, lines = _run(fill_zero=False)
    assert data == b"abchij"
    assert lines == [{"event": "stream.gap", "start": 3, "end": 7}]


def test_gap_fill_zero_keeps_offsets() -> None:
    data, lines = _run(fill_zero=True)
    assert data == b"abc" + bytes(4) + b"hij"
    assert len(lines) == 1


def test_stream_mode_arguments() -> None:
    assert stream_mode({}) == (Mode.RELIABLE, None)
    assert stream_mode({"mode": "deadline", "budget_ms": 150}) == (Mode.DEADLINE, 0.15)
    assert stream_mode({}, Mode.DATAGRAM) == (Mode.DATAGRAM, None)
    for bad in (
        {"mode": "fast"},
        {"mode": "reliable", "budget_ms": 100},
        {"mode": "deadline", "budget_ms": 0},
        {"mode": "deadline", "budget_ms": True},
    ):
        with pytest.raises(MeshpipeError):
            stream_mode(bad)
