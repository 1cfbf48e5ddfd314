"""e3/calibration.json through its owner (vllm_e3/calibration.py): what a
request's target, the planner's exit profile and the start-up checks read."""
import json

import pytest

from vllm_e3.calibration import Calibration, save
from vllm_e3.config import E3ConfigError

EXITS = [8, 16]


def _choice(measure, thr, frac):
    return {"measure": measure, "thresholds": thr, "exits_kept": [e for e, t in zip(EXITS, thr) if t is not None],
            "verify": {"exit_fraction": frac, "agreement": 0.99}}


RAW = {"exits": EXITS, "ramps_data_hash": "abc", "table": [
    {"target_agreement": 0.99, "policy": "full", "chosen": None, "reason": "no exit pays",
     "per_measure": {"gate": _choice("gate", [0.9, None], [0.05, 0.0]), "max_prob": "no saving"}},
    {"target_agreement": 0.95, "policy": "token", "chosen": _choice("gate", [0.8, 0.7], [0.1, 0.2]),
     "per_measure": {"gate": _choice("gate", [0.8, 0.7], [0.1, 0.2])}},
]}


def test_targets_resolve_to_the_least_strict_row_at_or_above():
    cal = Calibration.from_dict(RAW)
    assert [r.target for r in cal.rows] == [0.95, 0.99]
    assert cal.thresholds_for(0.9, (8, 16), "gate") == {8: 0.8, 16: 0.7}
    assert cal.thresholds_for(0.95, (8, 16), "gate") == {8: 0.8, 16: 0.7}
    assert cal.thresholds_for(0.97, (8, 16), "gate") is None          # the 0.99 row says full
    assert cal.thresholds_for(0.9, (8,), "gate") is None              # exits the engine lacks
    assert cal.thresholds_for(0.9, (8, 16), "max_prob") is None       # another measure


def test_exit_fractions_of_deployed_and_of_verified_choices():
    cal = Calibration.from_dict(RAW)
    assert cal.fractions_for({8: 0.8, 16: 0.7}, "gate") == {8: 0.1, 16: 0.2}
    assert cal.fractions_for({8: 0.9}, "gate") == {8: 0.05, 16: 0.0}  # verified, not deployed
    assert cal.fractions_for({8: 0.5}, "gate") is None
    assert cal.fractions_for({}, "gate") is None


def test_the_shortlist_a_measure_reads():
    cal = Calibration.from_dict(dict(RAW, shortlist=[7, 3, 9]))
    assert cal.shortlist_ids("shortlist@2") == [7, 3] and cal.shortlist_ids("gate") is None
    with pytest.raises(E3ConfigError, match="needs 4 shortlist tokens"):
        cal.shortlist_ids("shortlist@4")


def test_a_file_that_is_not_a_calibration_is_refused_naming_it(tmp_path):
    bad = dict(RAW, table=[{"target_agreement": 0.9, "policy": "token",
                            "chosen": _choice("gate", [0.5], [0.1])}])     # one threshold for two exits
    path = tmp_path / "calibration.json"
    with pytest.raises(E3ConfigError, match="1 thresholds for 2 exits"):
        save(str(path), bad)
    assert not path.exists()                                              # nothing written
    path.write_text("{not json")
    with pytest.raises(E3ConfigError, match=str(path)):
        Calibration.load(str(path))
    assert Calibration.load(str(tmp_path / "none.json")) is None
    save(str(path), RAW)
    assert json.loads(path.read_text()) == RAW and Calibration.load(str(path)).ramps_data_hash == "abc"
