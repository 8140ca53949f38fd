"""The core's parameters from the config: shared by the control and crypto workers."""

from __future__ import annotations

from meshpipe.actions import BROADCAST, MULTICAST
from meshpipe.config import Config, TimingSection
from meshpipe.link import compress
from meshpipe.node import InterfaceParams, Timing


def interface_params(cfg: Config) -> list[InterfaceParams]:
    out = []
    for i in cfg.interfaces:
        t = None if i.timing is None else section_timing(i.timing)
        if i.kind == "radio":
            # One transmission reaches every neighbour; the link header rides inside the MTU
            # (and the per-hop recovery header: InterfaceConfig.link_overhead).
            mtu = i.mtu - i.link_overhead
            # Routed DATA frames get the header compression's gain, unless per-hop
            # recovery wraps them (a LINK frame is not compressed).
            data_mtu = mtu + compress.GAIN if i.hop_recovery == "off" else 0
            p = InterfaceParams(i.name, mtu, BROADCAST, (), t, data_mtu)
        else:
            p = InterfaceParams(
                i.name,
                i.mtu - i.link_overhead,
                MULTICAST if i.discovery else None,
                tuple(i.peers),
                t,
            )
        out.append(p)
    return out


def timing(cfg: Config) -> Timing:
    return section_timing(cfg.timing)


def section_timing(t: TimingSection) -> Timing:
    return Timing(
        hello_interval=t.hello_interval,
        neighbour_timeout=t.neighbour_timeout,
        update_interval=t.update_interval,
        route_expiry=t.route_expiry,
    )
