"""Workers forked from the zygote (workers/zygote.py): what they inherit, restarts.

The probe runs in its own process (tests/zygote_probe.py): the zygote makes its
caller a child subreaper, which the test runner itself should not become.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PROBE = Path(__file__).resolve().parent / "zygote_probe.py"


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, str(PROBE)], capture_output=True, text=True, timeout=60, check=True
    )
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def test_worker_gets_only_its_descriptors_at_their_numbers(probe: dict[str, Any]) -> None:
    assert probe["first"]["fds"] == [0, 1, 2, 40]


def test_worker_is_the_supervisors_child_with_its_name(probe: dict[str, Any]) -> None:
    w = probe["first"]
    assert w["ppid"] == probe["me"]  # re-parented: the supervisor waits for it
    assert w["comm"] == "mp-probe:0"
    assert w["sighup_ignored"]  # until it installs its handler, as with Popen before


def test_preloaded_core_is_frozen_and_role_extras_are_not_loaded(probe: dict[str, Any]) -> None:
    w = probe["first"]
    assert w["frozen"] > 10_000 and w["gc_enabled"]
    assert not w["control_imported"]
    assert not w["services_worker_imported"]
    assert not w["pyroute2_imported"]


def test_restart_forks_from_the_clean_zygote(probe: dict[str, Any]) -> None:
    assert probe["first_code"] == -9
    again = probe["again"]
    assert again["pid"] != probe["first"]["pid"]
    assert not again["dirty"]  # the first worker's change to a module is not inherited
    assert probe["again_code"] == 7  # main()'s return value is the exit code


def test_a_dead_zygote_is_replaced_by_a_fresh_one(probe: dict[str, Any]) -> None:
    assert not probe["zygote_alive_after_kill"]
    assert probe["fresh_zygote"] != probe["zygote"]
    third = probe["third"]
    assert third["fds"] == [0, 1, 2, 40] and third["comm"] == "mp-probe:1"
    assert third["ppid"] == probe["me"] and third["frozen"] > 10_000
    assert probe["third_code"] == 7
