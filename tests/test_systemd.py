"""deploy/systemd/meshpipe.service passes `systemd-analyze verify` without warnings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "meshpipe.service"
INSTALLED_EXEC = "/usr/local/bin/meshpipe"


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not os.access(exe, os.X_OK):
        msg = "systemd-analyze not installed (Debian package: systemd)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def _meshpipe_script(tmp_path: Path) -> Path:
    """The real `meshpipe` console script, or a stub if it is not installed.

    `verify` checks that ExecStart= names an existing executable, so the installed
    path /usr/local/bin/meshpipe is replaced in the test copy. The script next to
    this interpreter (the venv's bin dir) is preferred over whatever PATH finds.
    """
    candidates = [Path(sys.executable).parent / "meshpipe"]
    found = shutil.which("meshpipe")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c.absolute()
    stub = tmp_path / "meshpipe"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return stub


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_EXEC} " in text and f"ExecReload={INSTALLED_EXEC} " in text
    script = _meshpipe_script(tmp_path)
    unit = tmp_path / "meshpipe.service"
    for key in ("ExecStart", "ExecReload"):
        text = text.replace(f"{key}={INSTALLED_EXEC} ", f"{key}={script} ", 1)
    unit.write_text(text)

    # User=meshpipe is left as is: `systemd-analyze verify` does not resolve users
    # (the meshpipe user does not exist on a test machine and nothing is created
    # on the host). Should a future systemd start complaining about it, the
    # assertions below show the message rather than hiding it.
    # The log level is pinned: warnings (unknown keys, bad values, missing
    # executables) are printed at "warning"; debug-level chatter such as syscall
    # names unknown to this libseccomp is not a problem with the unit.
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_PAGER": "", "LC_ALL": "C"}
    res = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    output = res.stdout + res.stderr
    assert res.returncode == 0, output
    about_unit = [
        line
        for line in output.splitlines()
        if re.search(r"meshpipe\.service|" + re.escape(str(unit)), line)
    ]
    assert about_unit == [], output


def test_unit_has_required_settings() -> None:
    """The settings the node relies on are present (verify does not check intent)."""
    settings: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "User": "meshpipe",
        "StateDirectory": "meshpipe",
        "RuntimeDirectory": "meshpipe",
        "ConfigurationDirectory": "meshpipe",
        "CapabilityBoundingSet": "CAP_NET_ADMIN CAP_NET_RAW",
        "AmbientCapabilities": "CAP_NET_ADMIN CAP_NET_RAW",
        "ProtectSystem": "strict",
        "DeviceAllow": "/dev/net/tun rw",
        "PrivateDevices": "no",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "UMask": "0077",
        "ExecReload": f"{INSTALLED_EXEC} reload -c /etc/meshpipe/meshpipe.toml",
        "KillMode": "mixed",
        "TimeoutStopSec": "15",
    }
    for key, value in expected.items():
        assert settings.get(key) == value, key
    assert "DynamicUser" not in settings
