"""Reload: re-read the config file and apply what changed to the running node.

Entry points: ``meshpipe reload`` (the control worker's ``reload`` command) and
SIGHUP to the supervisor (``systemctl reload``). Either way the file is validated
first; one that does not validate is refused with its file, key and reason
(``config.reload_refused``, and the CLI exits non-zero) and nothing changes.

- The **supervisor** (:func:`supervisor_reload`) starts, stops or replaces the
  metrics worker when ``[metrics]`` changed, takes the new log level and passes
  SIGHUP on to every worker. Workers are started with SIGHUP ignored, so one that is
  still starting is never killed by it.
- The **control worker** applies the sections registered in its :class:`Reloader`
  (``[[service]]`` and their ACLs, ``[exit]`` with its policy, the static ``peers`` of
  an interface, ``node.log_level`` and ``node.name``; see ``workers/control.py``),
  without touching sessions or streams.
- The **other workers** only take the new log level (:func:`follow_log_level`).

A changed key that no live handler takes (interfaces' addresses, worker counts,
timers, the tunnel, discovery timing, the key file, the control socket) cannot change
under a running node: it is logged in ``config.reloaded`` as ``restart_needed`` and
keeps its running value until the node restarts.

Extension point for a new section (say ``[dns]``): register it on the control
worker's reloader, ``worker.reloader.register("dns", apply)``, where ``apply(old, new)``
makes the change and returns the section's new running value (``new.dns`` when all
of it is live); pass ``live=`` to take only some of its keys.
"""

from __future__ import annotations

import os
import re
import signal
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any

from meshpipe import log
from meshpipe.config import DEFAULT_CONTROL_SOCKET, Config, load_config
from meshpipe.errors import ConfigError, MeshpipeError

if TYPE_CHECKING:
    from meshpipe_workers.control import ControlWorker

# Config fields whose TOML name differs (the tables are [[interface]], [[service]]).
_TOML_NAME = {"interfaces": "interface", "services": "service"}
_FIELD_NAME = {v: k for k, v in _TOML_NAME.items()}
_SECTION = re.compile(r"[a-z_]+")

Apply = Callable[[Config, Config], Any]  # (running, new) -> the section's new running value


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted TOML keys whose values differ: ``node.log_level``, ``interface[0].peers``,
    ``service`` (a whole array when its length changed)."""
    out: list[str] = []
    for f in fields(Config):
        if f.name == "path":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        name = _TOML_NAME.get(f.name, f.name)
        if is_dataclass(a) and is_dataclass(b):
            out += [f"{name}.{k}" for k in _diff_fields(a, b)]
        elif isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                if x != y:
                    out += [f"{name}[{i}].{k}" for k in _diff_fields(x, y)]
        else:
            out.append(name)
    return out


def _diff_fields(a: Any, b: Any) -> list[str]:
    if not (is_dataclass(a) and is_dataclass(b)):
        return [""]
    return [g.name for g in fields(a) if getattr(a, g.name) != getattr(b, g.name)]


def section_of(key: str) -> str:
    m = _SECTION.match(key)
    return m.group(0) if m else key


@dataclass(frozen=True)
class Outcome:
    config: Config  # the running config after the reload
    applied: list[str]
    restart_needed: list[str]
    failed: list[str]  # sections whose handler raised (their running value stays)


@dataclass
class _Handler:
    apply: Apply
    live: Callable[[str], bool]


class Reloader:
    """TOML section name -> a live handler; keys of no handler need a restart."""

    def __init__(self) -> None:
        self._handlers: dict[str, _Handler] = {}

    def register(
        self, section: str, apply: Apply, live: Callable[[str], bool] | Iterable[str] | None = None
    ) -> None:
        """``live``: which of the section's dotted keys ``apply`` takes (default all),
        as a predicate or as the last components (``["log_level", "name"]``)."""
        if section in self._handlers:
            raise ValueError(f"a reload handler for [{section}] is already registered")
        if live is None:
            pred: Callable[[str], bool] = lambda _key: True  # noqa: E731
        elif callable(live):
            pred = live
        else:
            names = frozenset(live)
            pred = lambda key: key.rsplit(".", 1)[-1] in names  # noqa: E731
        self._handlers[section] = _Handler(apply, pred)

    def plan(self, old: Config, new: Config) -> tuple[list[str], list[str]]:
        """(live keys, restart-needed keys) for going from ``old`` to ``new``."""
        live: list[str] = []
        restart: list[str] = []
        for key in changed_keys(old, new):
            h = self._handlers.get(section_of(key))
            (live if h is not None and h.live(key) else restart).append(key)
        return live, restart

    def apply(self, old: Config, new: Config) -> Outcome:
        live, restart = self.plan(old, new)
        running = old
        failed: list[str] = []
        for section in dict.fromkeys(section_of(k) for k in live):
            attr = _FIELD_NAME.get(section, section)
            try:
                value = self._handlers[section].apply(running, new)
            except Exception as exc:  # a handler's bug must not take the node down
                failed.append(section)
                log.get().error("config.reload_failed", section=section, error=repr(exc))
                continue
            running = replace(running, **{attr: value})
        applied = [k for k in live if section_of(k) not in failed]
        return Outcome(running, applied, restart, failed)


def load_for_reload(path: str) -> Config:
    """Load ``path``; on a ConfigError log ``config.reload_refused`` and re-raise."""
    try:
        return load_config(path)
    except ConfigError as exc:
        log.get().error("config.reload_refused", file=exc.path, key=exc.key, reason=exc.reason)
        raise


def follow_log_level(config_path: str) -> None:
    """SIGHUP makes this process take the log level of the (valid) config file."""

    def on_hup(_sig: int, _frame: object) -> None:
        try:
            cfg = load_config(config_path)
        except ConfigError:
            return  # refused and logged by the supervisor
        log.set_level(cfg.node.log_level)

    signal.signal(signal.SIGHUP, on_hup)


def ignore_sighup_in_child() -> None:
    """Run in every worker as the zygote forks it: SIGHUP stays ignored until it
    installs its own handler, so a reload never kills a worker that is still starting."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def signal_supervisor(supervisor_pid: int | None) -> None:
    """Ask the supervisor (the control worker's parent) to reload."""
    if not supervisor_pid or supervisor_pid != os.getppid():
        raise MeshpipeError("reload: the supervisor is not known yet; try again in a moment")
    os.kill(supervisor_pid, signal.SIGHUP)


# -- the control worker's live handlers -------------------------------------------------


def control_reloader(w: ControlWorker) -> Reloader:
    """The sections the control worker applies live (see the module docstring)."""
    r = Reloader()
    r.register("node", lambda old, new: _node(old, new), live=("log_level", "name"))
    r.register("interface", lambda old, new: _peers(w, old, new), live=("peers",))
    r.register("service", lambda old, new: _services(w, old, new))
    r.register("exit", lambda old, new: _exit(w, old, new))
    # The supervisor replaces the metrics worker; nothing to do here.
    r.register("metrics", lambda _old, new: new.metrics)
    return r


def _node(old: Config, new: Config) -> Any:
    log.set_level(new.node.log_level)
    return replace(old.node, log_level=new.node.log_level, name=new.node.name)


def _peers(w: ControlWorker, old: Config, new: Config) -> Any:
    """New static peers: hellos and routing go to them from the next one on."""
    core = w.core.core
    out = []
    for i, (o, n) in enumerate(zip(old.interfaces, new.interfaces, strict=True)):
        if o.peers != n.peers and o.kind == "udp":
            params = list(core.interfaces)
            params[i] = replace(params[i], static_peers=tuple(n.peers))
            core.interfaces = tuple(params)
            o = replace(o, peers=n.peers)
        out.append(o)
    return tuple(out)


def _services(w: ControlWorker, old: Config, new: Config) -> Any:
    """[[service]] tables added, removed or changed. An ACL or target change is made
    in place (streams already accepted stay); a new port or `hidden` re-exposes."""
    svcs = w.services
    now = time.monotonic()
    before = {s.name: s for s in old.services}
    after = {s.name: s for s in new.services}
    for name, s in before.items():
        n = after.get(name)
        if (n is None or (n.port, n.hidden, n.kind) != (s.port, s.hidden, s.kind)) and (
            name in svcs.exposed
        ):
            svcs.unexpose(name, now)
    for name, n in after.items():
        live = svcs.exposed.get(name)
        if live is None:
            svcs.expose(n.name, n.to, n.port, n.allow, n.hidden, now)
        elif (live.to, live.acl) != (n.to, n.allow):
            live.to, live.acl = n.to, n.allow
            log.get().info("service.updated", **live.as_json())
    return new.services


def _exit(w: ControlWorker, old: Config, new: Config) -> Any:
    svcs = w.services
    now = time.monotonic()
    svcs.exit_policy_cfg = new.exit
    if new.exit.enabled:
        svcs.enable_exit(new.exit.allow, now)
    elif old.exit.enabled and svcs.exit_acl is not None:
        svcs.disable_exit(now)
    return new.exit


def control_socket_of(path: str) -> str:
    """The control socket named by the file at ``path``, even when the file no longer
    validates (the node must still be told, so that it refuses and logs why)."""
    try:
        return load_config(path).node.control_socket
    except ConfigError:
        pass
    try:
        with open(path, "rb") as f:
            node = tomllib.load(f).get("node", {})
        sock = node.get("control_socket", DEFAULT_CONTROL_SOCKET)
        if isinstance(sock, str) and sock:
            return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), sock))
    except (OSError, ValueError, AttributeError):
        pass
    return DEFAULT_CONTROL_SOCKET
