"""RTT estimation and congestion control for MSP streams.

RTT: RFC 6298 (srtt, rttvar, RTO with a floor) plus a windowed minimum RTT, which
the congestion controller and deadline mode use as the path's base delay.

Congestion control: TCP Veno (Fu and Liew, IEEE JSAC 2003), chosen because a mesh
loses packets on radio links for reasons that have nothing to do with congestion.
Veno keeps Reno's additive increase but estimates how many of its own packets sit
in queues, ``backlog = cwnd * (rtt - base_rtt) / rtt`` (Vegas's estimate). A loss
seen while the backlog is small cannot have been caused by a full queue, so it is
taken as random loss and the window shrinks only to 4/5; a loss with a backlog of
``beta`` packets or more is congestion and halves the window, as Reno would. Under
heavy random loss (a 30% radio hop) this keeps the window open where Reno would
collapse it, while flows that really fill a queue still back off and share it:
several Veno flows on one bottleneck converge to fair shares like Reno flows do.

One addition: a ceiling on the standing queue (Vegas's idea). Veno only slows its
growth when queues build; a node's own queues (rings, socket buffers) are deep, and
a bulk stream would fill them to the receive window, adding a hundred milliseconds
to every interactive stream on the same path; on a 19,200 bit/s radio the same
window is many seconds of queue. The window stops growing (and slow start ends)
while the estimated backlog is above ``max_backlog`` packets or the queueing delay
(smoothed RTT minus the minimum) is above the larger of ``max_queue_delay`` and two
minimum RTTs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RttEstimator:
    """RFC 6298 estimator. Times are seconds."""

    initial_rto: float = 1.0
    min_rto: float = 0.2
    max_rto: float = 30.0
    min_window: float = 10.0  # the minimum RTT is the lowest sample of this long
    srtt: float = 0.0
    rttvar: float = 0.0
    latest: float = 0.0
    min_rtt: float = 0.0  # 0.0 until the first sample
    _min_at: float = 0.0
    _samples: int = 0
    _provisional: bool = False

    def sample(self, rtt: float, now: float, *, provisional: bool = False) -> None:
        """One RTT sample. A ``provisional`` one (the stream handshake's, which may
        include waiting for the session's own handshake, seconds on a lossy path) is
        replaced outright by the first real sample instead of being averaged away
        over dozens of round trips, each paying its inflated timeouts."""
        rtt = max(rtt, 1e-4)
        self.latest = rtt
        if self._provisional and not provisional:
            self._provisional = False
            self._samples = 0
            self.min_rtt = 0.0
        elif provisional:
            self._provisional = self._samples == 0
        if self._samples == 0:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self._samples += 1
        if self.min_rtt == 0.0 or rtt <= self.min_rtt or now - self._min_at > self.min_window:
            self.min_rtt, self._min_at = rtt, now

    @property
    def has_sample(self) -> bool:
        return self._samples > 0

    def rto(self) -> float:
        if not self._samples:
            return self.initial_rto
        t = self.srtt + 4 * self.rttvar
        if self._provisional:
            t = min(t, self.initial_rto)
        return min(self.max_rto, max(self.min_rto, t))

    def pto(self, max_ack_delay: float, min_pto: float) -> float:
        """The probe timeout (RFC 9002 6.2): how long a flight may go unanswered.

        No 200 ms floor as the RTO has: on a 3 ms path that floor is 70 round trips
        of silence after every tail loss, and when a whole GSO batch (the entire
        flight) is dropped, every loss is a tail loss."""
        if not self._samples:
            return self.initial_rto
        t = self.srtt + max(4 * self.rttvar, 0.001) + max_ack_delay
        if self._provisional:  # seconds of session handshake say nothing of the path
            t = min(t, self.initial_rto)
        return min(self.max_rto, max(min_pto, t))


@dataclass
class Veno:
    """Window in bytes; ``mss`` is the segment payload size."""

    mss: int
    initial_segments: int = 10
    beta: float = 3.0  # backlog (packets) above which a loss means congestion
    max_backlog: float = 100.0  # no growth above this backlog (packets) ...
    max_queue_delay: float = 0.05  # ... or above this queueing delay (or 2 base RTTs)
    cwnd: float = 0.0
    ssthresh: float = float("inf")
    _ca_toggle: bool = False
    random_losses: int = 0
    congestion_losses: int = 0

    def __post_init__(self) -> None:
        if self.cwnd == 0.0:
            self.cwnd = float(self.initial_segments * self.mss)

    def backlog(self, rtt: RttEstimator) -> float:
        if not rtt.has_sample or rtt.srtt <= 0:
            return 0.0
        base = rtt.min_rtt
        return (self.cwnd / self.mss) * max(0.0, rtt.srtt - base) / rtt.srtt

    def queue_delay(self, rtt: RttEstimator) -> float:
        """How much longer round trips take now than at best: time spent in queues."""
        return max(0.0, rtt.srtt - rtt.min_rtt) if rtt.has_sample else 0.0

    def on_ack(self, acked: int, rtt: RttEstimator, app_limited: bool) -> None:
        """``acked`` bytes newly acknowledged."""
        if app_limited:  # a window we are not using says nothing about the path
            return
        backlog = self.backlog(rtt)
        if backlog >= self.max_backlog or self.queue_delay(rtt) > max(
            2 * rtt.min_rtt, self.max_queue_delay
        ):
            self.ssthresh = min(self.ssthresh, self.cwnd)
            return
        if self.cwnd < self.ssthresh:
            self.cwnd += acked
            return
        if backlog >= self.beta:
            # Veno: near the available bandwidth, grow every other window only.
            self._ca_toggle = not self._ca_toggle
            if not self._ca_toggle:
                return
        self.cwnd += self.mss * acked / self.cwnd

    def on_loss(self, rtt: RttEstimator) -> None:
        """One loss event (at most one per round trip, the caller ensures)."""
        if self.backlog(rtt) < self.beta:
            self.random_losses += 1
            self.cwnd = max(self.cwnd * 0.8, 2.0 * self.mss)
        else:
            self.congestion_losses += 1
            self.cwnd = max(self.cwnd * 0.5, 2.0 * self.mss)
        self.ssthresh = self.cwnd

    def on_persistent_congestion(self, rtt: RttEstimator) -> None:
        """Several probe timeouts in a row: the path may be gone or badly congested.

        Veno's test again: without a standing queue before the silence, the probes
        were lost at random (bursts on a lossy link take several in a row), and a
        window collapsed to two segments would make every later loss a tail loss
        again; the losses have already cut the window. With a queue, collapse."""
        if self.backlog(rtt) < self.beta:
            self.random_losses += 1
            return
        self.ssthresh = max(self.cwnd * 0.5, 2.0 * self.mss)
        self.cwnd = 2.0 * self.mss

    def set_mss(self, mss: int) -> None:
        self.cwnd = self.cwnd * mss / self.mss
        self.mss = mss


__all__ = ["RttEstimator", "Veno"]
