"""A real node's workers come from its zygote; a restart too, and after the zygote died.

Loopback, no root: two nodes, two crypto workers each.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from meshpipe_workers.labnet import Lab


def _sup(lab: Lab) -> dict[str, Any]:
    st = lab.cli("x", "status")
    assert st is not None
    return dict(st["supervisor"])


def _crypto0(lab: Lab) -> dict[str, Any] | None:
    return next((w for w in _sup(lab)["workers"] if w["role"] == "crypto:0" and w["pid"]), None)


def test_workers_restart_from_the_zygote_and_from_a_fresh_one(tmp_path: Path) -> None:
    port = 22000 + os.getpid() % 20000
    extra = "[workers]\ncrypto = 2\n"
    with Lab(["x", "y"], tmp_path, netns=False, base_port=port, extra_config=extra) as lab:
        lab.start_all()
        lab.wait_for(lambda: lab.route("x", "y") is not None, 30, "x's route to y")
        sup = _sup(lab)
        zygote = sup["zygote"]["pid"]
        assert sup["zygote"]["pss_bytes"] > 0
        for w in sup["workers"]:
            assert w["pss_bytes"] > 0 and w["rss_bytes"] >= w["pss_bytes"]
            assert Path(f"/proc/{w['pid']}/comm").read_text().strip() == f"mp-{w['role']}"[:15]
            ppid = int(Path(f"/proc/{w['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert ppid == sup["pid"]  # re-parented to the supervisor
        old = _crypto0(lab)
        assert old is not None
        os.kill(old["pid"], signal.SIGKILL)
        new = lab.wait_for(
            lambda: (w := _crypto0(lab)) and w["pid"] != old["pid"] and w, 10, "restart"
        )
        assert new["restarts"] == 1 and _sup(lab)["zygote"]["pid"] == zygote

        os.kill(zygote, signal.SIGKILL)
        os.kill(new["pid"], signal.SIGKILL)
        again = lab.wait_for(
            lambda: (w := _crypto0(lab)) and w["pid"] != new["pid"] and w, 15, "restart"
        )
        assert again["restarts"] == 2
        assert _sup(lab)["zygote"]["pid"] != zygote
        events = [e.get("event") for e in lab.log_events("x")]
        assert "zygote.restarted" in events
        res = lab.cli("x", "ping", lab.nodes["y"].sid[:8], "--count", "2", "--interval", "0.1")
        assert res["received"] == 2
