"""Which node `meshpipe trace NAME` traces: node-record claimants first (nearest wins)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from meshpipe.names import Claimant
from meshpipe_workers.trace_jobs import TraceJobs

OWN, NEAR, FAR, UNREACHABLE = (bytes([n]) * 32 for n in (1, 2, 3, 4))


def _jobs(claimants: list[Claimant], traced: dict[bytes, str] | None = None) -> TraceJobs:
    core: Any = SimpleNamespace(
        sid=OWN,
        node_claimants=lambda: claimants,
        trace=SimpleNamespace(names=traced or {}),
    )
    return TraceJobs(core, lambda *_: None, lambda: {OWN, NEAR, FAR, UNREACHABLE})


def test_a_claimed_name_traces_the_nearest_reachable_claimant() -> None:
    jobs = _jobs(
        [
            Claimant(OWN, "d", 0),
            Claimant(FAR, "d", 900),
            Claimant(NEAR, "d", 300),
            Claimant(UNREACHABLE, "d", None),
        ]
    )
    assert jobs.target("d") == NEAR


def test_names_from_earlier_traces_and_sid_prefixes_still_work() -> None:
    jobs = _jobs([], traced={FAR: "c"})
    assert jobs.target("c") == FAR
    assert jobs.target(NEAR.hex()[:16]) == NEAR
