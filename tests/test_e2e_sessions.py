"""End-to-end encryption with real processes in namespaces A - B - C - D."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from meshpipe_workers.labnet import Lab
from tests.netns import require_root

pytestmark = pytest.mark.netns

MARKER = b"MESHPIPE-PLAINTEXT-MARKER-7f3a"

# Sniff every frame on every interface of the namespace it runs in (AF_PACKET),
# for argv[1] seconds, and write the raw bytes to argv[2].
SNIFFER = r"""
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.settimeout(0.2)
end = time.monotonic() + float(sys.argv[1])
frames = 0
with open(sys.argv[2], "wb") as out:
    print("ready", flush=True)
    while time.monotonic() < end:
        try:
            data = s.recv(65535)
        except TimeoutError:
            continue
        frames += 1
        out.write(len(data).to_bytes(4, "big") + data)
print(frames, flush=True)
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    with Lab(["a", "b", "c", "d"], tmp_path_factory.mktemp("sess"), netns=True) as lab:
        lab.start_all()
        lab.wait_for(lambda: (r := lab.route("a", "d")) and r["hops"] == 3, 30, "a's route to d")
        yield lab


def test_ping_across_three_hops(lab: Lab) -> None:
    d_prefix = lab.nodes["d"].sid[:12]  # an unambiguous prefix is accepted
    res = lab.cli("a", "ping", d_prefix, "--count", "5", "--interval", "0.2")
    assert res is not None
    assert res["sent"] == 5
    assert res["received"] == 5
    assert len(res["rtt_ms"]) == 5
    assert res["hops"] == 3
    sessions = lab.cli("a", "sessions")
    assert [s["peer"] for s in sessions] == [lab.nodes["d"].sid]
    assert sessions[0]["state"] == "established"
    text = lab.cli_text("a", "ping", d_prefix, "--count", "1")
    assert "1 received" in text


def test_transit_capture_never_contains_plaintext(lab: Lab) -> None:
    assert lab.topo is not None
    cap = f"/tmp/meshpipe-capture-{lab.prefix}.bin"
    sniffer = lab.topo.exec(
        "b", [sys.executable, "-c", SNIFFER, "6", cap], stdout=subprocess.PIPE, text=True
    )
    assert sniffer.stdout is not None
    assert sniffer.stdout.readline().strip() == "ready"
    res = lab.cli(
        "a",
        "ping",
        lab.nodes["d"].sid,
        "--count",
        "5",
        "--interval",
        "0.2",
        "--size",
        "600",
        "--pattern",
        MARKER.hex(),
    )
    assert res is not None and res["received"] == 5
    out, _ = sniffer.communicate(timeout=20)
    assert int(out.strip().splitlines()[-1]) > 0
    with open(cap, "rb") as fh:
        captured = fh.read()
    subprocess.run(["rm", "-f", cap], check=False)
    # The capture works: the cleartext DATA header names D as destination...
    assert bytes.fromhex(lab.nodes["d"].sid) in captured
    # ...but the payload that crossed B was never readable there.
    assert MARKER not in captured
    assert MARKER[:12] not in captured
