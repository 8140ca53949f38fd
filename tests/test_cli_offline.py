"""CLI commands that need no running node: ``meshpipe id`` reads the config and key file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from meshpipe.identity import Identity


def test_id_works_without_a_running_node(tmp_path: Path) -> None:
    ident = Identity.generate()
    ident.write(str(tmp_path / "node.key"))
    cfg = tmp_path / "meshpipe.toml"
    cfg.write_text(
        '[node]\nkey = "node.key"\ncontrol_socket = "nobody-listens.sock"\nname = "alpha"\n'
        '[[interface]]\nname = "udp0"\nkind = "udp"\nlisten = "127.0.0.1:7700"\n'
    )
    argv = [sys.executable, "-m", "meshpipe", "id", "-c", str(cfg)]
    out = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got == {"sid": str(ident.sid), "ipv6": str(ident.sid.ipv6()), "name": "alpha"}
    text = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    assert str(ident.sid) in text and str(ident.sid.ipv6()) in text
