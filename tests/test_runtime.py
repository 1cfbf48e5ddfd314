"""The runner's E3 state (vllm_e3.runtime): one home per piece, nothing left
behind when requests end, the finished-request LRU bounded."""
import torch

from vllm_e3.models.rows import Parked
from vllm_e3.knobs import FULL_RULES
from vllm_e3.runtime import E3Runtime, RequestCounters


def _parked(start=8):
    return Parked(start, torch.zeros(4), torch.zeros(4), position=7, token=11, waited=1)


def test_finish_drops_rules_parking_and_running_counters():
    rt = E3Runtime()
    rt.rules.rules["a"] = FULL_RULES
    rt.rules.rules["b"] = FULL_RULES
    rt.parking.park("a", _parked())
    rt.counters.of("a").tokens += 3
    rt.counters.of("b").tokens += 1
    assert rt.live_state() == {"parked_now": 1, "requests_tracked": 2, "requests_admitted": 2}
    rt.finish(["a"])
    assert rt.live_state() == {"parked_now": 0, "requests_tracked": 1, "requests_admitted": 1}
    assert rt.counters.known()["a"].tokens == 3          # readable after it ended
    rt.rules.rules["c"] = FULL_RULES                     # admitted, finished before a decode step
    rt.finish(["b", "c", "elsewhere"])                   # "elsewhere": another DP engine's request
    assert rt.live_state() == {"parked_now": 0, "requests_tracked": 0, "requests_admitted": 0}
    assert rt.counters.known()["c"].tokens == 0
    assert "elsewhere" not in rt.counters.known()


def test_parking_lot_hands_over_everything_once():
    rt = E3Runtime()
    rt.parking.park("a", _parked(8))
    rt.parking.park("b", _parked(16))
    taken = rt.parking.take_all()
    assert sorted(taken) == ["a", "b"] and taken["b"].start == 16
    assert len(rt.parking) == 0 and rt.parking.take_all() == {}


def test_finished_lru_is_bounded_and_keeps_the_newest():
    c = RequestCounters()
    c.FINISHED_KEPT = 3
    for i in range(5):
        c.of(f"r{i}").tokens = i
        c.finish([f"r{i}"])
    assert list(c.finished) == ["r2", "r3", "r4"]
    assert not c.running


def test_reset_stats_keeps_request_state():
    rt = E3Runtime()
    rt.stats.decode_tokens = 5
    rt.counters.of("a").tokens = 2
    rt.reset_stats()
    assert rt.stats.decode_tokens == 0 and rt.counters.of("a").tokens == 2
