"""The UDP flow table against a plain model (hypothesis state machine)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from meshpipe.services.udp_flows import FlowTable

IDLE = 5.0
MAX = 4
keys = st.integers(0, 7)


class FlowTableModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table: FlowTable[int, int] = FlowTable(IDLE, MAX)
        self.now = 0.0
        self.model: dict[int, tuple[int, float]] = {}  # key -> (value, last used)
        self.serial = 0

    @rule(dt=st.floats(0, 4))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(key=keys)
    def add(self, key: int) -> None:
        self.serial += 1
        evicted = dict(self.table.add(key, self.serial, self.now))
        if key in self.model:
            assert evicted.pop(key) == self.model.pop(key)[0]
        times = []
        for k, v in evicted.items():
            value, used = self.model.pop(k)
            assert value == v
            times.append(used)
        # LRU: no flow left behind was used before one that was evicted.
        assert all(t <= u for t in times for _, u in self.model.values())
        assert len(self.model) < MAX
        self.model[key] = (self.serial, self.now)

    @rule(key=keys)
    def touch(self, key: int) -> None:
        self.table.touch(key, self.now)
        if key in self.model:
            self.model[key] = (self.model[key][0], self.now)

    @rule(key=keys)
    def remove(self, key: int) -> None:
        got = self.table.remove(key)
        want = self.model.pop(key, None)
        assert got == (None if want is None else want[0])

    @rule()
    def expire(self) -> None:
        gone = dict(self.table.expire(self.now))
        want = {k: v for k, (v, t) in self.model.items() if self.now - t >= IDLE}
        assert gone == want
        for k in want:
            del self.model[k]

    @precondition(lambda self: self.model)
    @rule()
    def deadline(self) -> None:
        assert self.table.next_deadline() == min(t for _, t in self.model.values()) + IDLE

    @invariant()
    def same_contents(self) -> None:
        assert len(self.table) <= MAX
        assert {k: v for k, v in self.table.items()} == {k: v for k, (v, _) in self.model.items()}


TestFlowTable = FlowTableModel.TestCase
TestFlowTable.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_a_new_client_beyond_the_limit_evicts_the_least_recently_used() -> None:
    t: FlowTable[str, int] = FlowTable(10.0, 2)
    t.add("a", 1, 0.0)
    t.add("b", 2, 1.0)
    t.touch("a", 2.0)
    assert t.add("c", 3, 3.0) == [("b", 2)]
    assert sorted(k for k, _ in t.items()) == ["a", "c"]
