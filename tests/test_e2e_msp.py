"""MSP streams with real processes: `meshpipe msp listen` / `msp connect` across A-B-C-D."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpipe_workers.labnet import Lab
from tests.netns import require_root

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    with Lab(["a", "b", "c", "d"], tmp_path_factory.mktemp("msp"), netns=True) as lab:
        lab.start_all()
        lab.wait_for(lambda: (r := lab.route("a", "d")) and r["hops"] == 3, 30, "a's route to d")
        yield lab


def _listen(lab: Lab, port: int, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = lab.popen(
        "d",
        "msp",
        "listen",
        str(port),
        *extra,
        stdin=subprocess.DEVNULL,
        stdout=out.open("wb"),
        stderr=subprocess.PIPE,
    )
    lab.wait_for(
        lambda: any(s["port"] == port for s in lab.cli("d", "status")["listening"]),
        10,
        "the listener",
    )
    return proc


def test_50mb_file_across_three_hops_byte_exact(lab: Lab, tmp_path: Path) -> None:
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(os.urandom(50 * 1000 * 1000))
    listener = _listen(lab, 5000, dst)
    with src.open("rb") as stdin:
        sender = lab.popen(
            "a",
            "msp",
            "connect",
            lab.nodes["d"].sid[:16],
            "5000",
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, err = sender.communicate(timeout=240)
    assert sender.returncode == 0, err
    assert listener.wait(30) == 0, listener.stderr.read() if listener.stderr else ""
    digest = hashlib.sha256
    assert digest(dst.read_bytes()).digest() == digest(src.read_bytes()).digest()
    events = [e for e in lab.log_events("d") if e.get("event") == "stream.close"]
    assert events and events[-1]["reason"] == "closed" and events[-1]["bytes_in"] == 50_000_000


def test_both_directions_and_half_close(lab: Lab, tmp_path: Path) -> None:
    """The listener answers after the connector's EOF (request, then reply)."""
    out = tmp_path / "reply.bin"
    listener = lab.popen(
        "d",
        "msp",
        "listen",
        "5001",
        stdin=subprocess.PIPE,
        stdout=out.open("wb"),
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    sender = lab.popen(
        "a",
        "msp",
        "connect",
        lab.nodes["d"].sid,
        "5001",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert sender.stdin is not None and listener.stdin is not None
    sender.stdin.write(b"question\n")
    sender.stdin.close()  # half-close: the reply must still come back
    lab.wait_for(lambda: out.read_bytes() == b"question\n", 20, "the request at d")
    listener.stdin.write(b"answer\n" * 1000)
    listener.stdin.close()
    assert sender.stdout is not None and sender.stderr is not None
    reply = sender.stdout.read()
    assert sender.wait(30) == 0, sender.stderr.read()
    assert reply == b"answer\n" * 1000
    assert listener.wait(10) == 0


def test_refused_and_denied_are_reported_not_hung(lab: Lab, tmp_path: Path) -> None:
    t0 = time.monotonic()
    res = lab.run("a", "msp", "connect", lab.nodes["d"].sid, "5999")
    assert res.returncode != 0 and "refused" in res.stderr
    assert time.monotonic() - t0 < 10
    # A listener that allows only B: A is denied, and D logs it with A's SID.
    listener = _listen(lab, 5002, tmp_path / "x.bin", "--allow", lab.nodes["b"].sid)
    res = lab.run("a", "msp", "connect", lab.nodes["d"].sid, "5002")
    assert res.returncode != 0 and "denied" in res.stderr
    denied = [e for e in lab.log_events("d") if e.get("event") == "acl.denied"]
    assert denied and denied[-1]["sid"] == lab.nodes["a"].sid
    listener.terminate()
    listener.wait(10)
