"""`e3/calibration.json`: its schema and its one owner.

`vllm-e3 calibrate` (vllm_e3.tools.calibrate) writes it with `save`; the serving
path reads it with `Calibration.load`: per-request targets (vllm_e3.knobs),
the start-up checks against the ramps (patches/patch_arg_utils.py) and the
planner's exit profile (vllm_e3.planner). The file is a JSON object:

    exits            [int]      the calibrated exit points
    ramps_data_hash  str        the data hash of the ramps it was made for
    table            [row]      one per target agreement
      target_agreement float
      policy           "token" | "full"  (full: no exit meets the target and pays)
      chosen           choice | null     what a request asking for the target gets
      per_measure      {measure: choice | str | null}  every measure's verified
                                 choice (str / null: why it has none)
      reason           str        (policy full) why
    choice:
      measure          str                one of vllm_e3.config.CONFIDENCE_MEASURES
                                          (or a report-only one, e.g. shortlist@K)
      thresholds       [float | null]     one per exit (null: that exit never fires)
      exits_kept       [int]
      verify           {agreement, exit_fraction: [float] per exit, cp_upper_95, ...}
      engine_net_cost  {"b16": float, ...} | absent
    shortlist        [int]      token ids, most served on the training corpus first:
                                the measure shortlist@K reads the first K

plus the provenance calibrate records (commands, hashes, costs, engine model),
which this module keeps as it is (`raw`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .config import CONFIDENCE_MEASURES, SHORTLIST, E3ConfigError, known_measure, shortlist_k
from .files import write_json


@dataclass(frozen=True)
class Choice:
    """One measure's verified thresholds at one target."""
    measure: str
    thresholds: dict[int, float]        # exit -> threshold, the exits that fire
    exit_fraction: dict[int, float]     # exit -> verified fraction of tokens leaving there


@dataclass(frozen=True)
class Row:
    target: float
    chosen: Choice | None               # None: the row says policy full
    per_measure: dict[str, Choice] = field(default_factory=dict)
    reason: str | None = None


@dataclass(frozen=True)
class Calibration:
    exits: tuple[int, ...]
    rows: tuple[Row, ...]               # ascending target
    ramps_data_hash: str | None
    source: str
    raw: dict
    shortlist: tuple[int, ...] = ()     # token ids, most served first (measures shortlist@K)

    # ---- reading and writing -------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "calibration") -> "Calibration":
        """The calibration in `raw`; E3ConfigError naming `source` when it is not one."""
        try:
            exits = tuple(int(e) for e in raw["exits"])
            rows = []
            for r in raw["table"]:
                chosen = r.get("chosen") or None
                per = {m: _choice(v, exits) for m, v in (r.get("per_measure") or {}).items()
                       if isinstance(v, dict)}
                rows.append(Row(float(r["target_agreement"]),
                                None if r.get("policy") == "full" or not chosen else _choice(chosen, exits),
                                per, r.get("reason")))
            shortlist = tuple(int(t) for t in raw.get("shortlist") or ())
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise E3ConfigError(f"cannot read calibration table {source}: {type(exc).__name__}: {exc}") from exc
        return cls(exits, tuple(sorted(rows, key=lambda r: r.target)), raw.get("ramps_data_hash"), source, raw,
                   shortlist)

    @classmethod
    def load(cls, path: str) -> "Calibration | None":
        """The calibration at `path`, None if there is no such file."""
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, ValueError) as exc:
            raise E3ConfigError(f"cannot read calibration table {path}: {type(exc).__name__}: {exc}") from exc
        return cls.from_dict(raw, path)

    # ---- queries ---------------------------------------------------------
    def thresholds_for(self, target: float, exits: tuple[int, ...], measure: str) -> dict[int, float] | None:
        """Thresholds (exit -> threshold) for a request asking for `target`,
        or None: run the full model. Only rows this engine can honour exactly
        (their exits among the engine's, their measure the engine's) count;
        a row that exits nowhere means the full model."""
        for row in self.rows:
            if row.target < target:
                continue
            if row.chosen is None or not row.chosen.thresholds:
                return None
            if row.chosen.measure == measure and set(row.chosen.thresholds) <= set(exits):
                return row.chosen.thresholds
        return None

    def fractions_for(self, thresholds: dict[int, float], measure: str) -> dict[int, float] | None:
        """The verified exit fractions of the choice whose thresholds a config
        deploys: a row's chosen one, or any measure's verified choice (an
        operator may deploy one the table did not choose), else None."""
        if not thresholds:
            return None
        for row in self.rows:
            for c in (row.chosen, *row.per_measure.values()):
                if c is not None and c.measure == measure and c.thresholds == thresholds:
                    return dict(c.exit_fraction)
        return None

    def shortlist_ids(self, measure: str) -> list[int] | None:
        """The token ids confidence `measure` reads ("shortlist@K": the first
        K of the shortlist), None for the other measures; E3ConfigError when
        the file's shortlist is shorter."""
        k = shortlist_k(measure)
        if k is None:
            return None
        if len(self.shortlist) < k:
            raise E3ConfigError(f"confidence {measure!r} needs {k} shortlist tokens and calibration table "
                                f"{self.source} has {len(self.shortlist)}: recalibrate with `vllm-e3 "
                                f"calibrate`, or choose a smaller K")
        return list(self.shortlist[:k])

    def check_against_ramps(self, ramps_path: str | None, ramps_meta: dict | None, specs: dict) -> None:
        """Refuse a table made for other ramps: an exit the ramps file does
        not hold, a measure vllm-e3 does not know, `gate` rows at exits
        without a gate, or a recorded ramps data hash that differs.
        `specs`: vllm_e3.ramps.validate_ramps over the table's exits ({}
        without a ramps file: identity ramps, which have no gates)."""
        where = f"calibration table {self.source}"
        if ramps_meta is not None:
            have = set(json.loads(ramps_meta.get("exits", "[]")))
            missing = sorted(set(self.exits) - have)
            if missing:
                raise E3ConfigError(f"{where} names exits {missing} that the ramps file {ramps_path} does "
                                    f"not have (it has {sorted(have)}): recalibrate with `vllm-e3 calibrate`")
            want = ramps_meta.get("data_hash")
            if self.ramps_data_hash and want and self.ramps_data_hash != want:
                raise E3ConfigError(f"{where} was made for other ramps (data hash {self.ramps_data_hash[:12]}, "
                                    f"the ramps file {ramps_path} has {want[:12]}): recalibrate")
        for row in self.rows:
            c = row.chosen
            if c is None:
                continue
            if not known_measure(c.measure):
                raise E3ConfigError(f"{where}: row for target {row.target} uses confidence measure "
                                    f"{c.measure!r}; vllm-e3 knows {list(CONFIDENCE_MEASURES)} and "
                                    f"{SHORTLIST}K")
            k = shortlist_k(c.measure)
            if k is not None and len(self.shortlist) < k:
                raise E3ConfigError(f"{where}: row for target {row.target} uses {c.measure}, and the "
                                    f"file's shortlist has {len(self.shortlist)} tokens")
            if c.measure == "gate":
                gateless = sorted(e for e in c.thresholds if not (e in specs and specs[e].has_gate))
                if gateless:
                    raise E3ConfigError(f"{where}: row for target {row.target} scores confidence 'gate' "
                                        f"at exits {gateless}, where {ramps_path or 'the identity ramps'} "
                                        f"have no gate")


def _choice(d: dict, exits: tuple[int, ...]) -> Choice:
    thr = d["thresholds"]
    if len(thr) != len(exits):
        raise ValueError(f"a row has {len(thr)} thresholds for {len(exits)} exits")
    frac = d.get("verify", {}).get("exit_fraction") or [0.0] * len(exits)
    return Choice(str(d["measure"]), {e: float(t) for e, t in zip(exits, thr) if t is not None},
                  {e: float(f) for e, f in zip(exits, frac)})


def row_summary(r: dict) -> dict:
    """A table row as the reports show it (`vllm-e3 calibrate`'s report.json,
    `vllm-e3 tune`'s summary): the chosen measure, the exits that fire and
    their thresholds, the verified agreement and its 95% bound, and the
    fraction of layers skipped; a `full` row with its reason."""
    b = r["chosen"]
    if b is None:
        return {"target": r["target_agreement"], "policy": "full", "reason": r.get("reason")}
    v = b["verify"]
    return {"target": r["target_agreement"], "policy": r["policy"], "measure": b["measure"],
            "engine_net_cost": b.get("engine_net_cost"),
            "exits": b["exits_kept"], "thresholds": [t for t in b["thresholds"] if t is not None],
            "agreement": v["agreement"], "cp_upper_95": v["cp_upper_95"],
            "exit_fraction": [f for f, t in zip(v["exit_fraction"], b["thresholds"]) if t is not None],
            "layers_skipped": v["expected_layers_skipped_fraction"], "net_cost": v["expected_net_cost"]}


def save(path: str, raw: dict) -> Calibration:
    """Write `raw` (as calibrate makes it) to `path` atomically, after reading
    it back as a Calibration, so a file the serving path cannot read is never
    written."""
    cal = Calibration.from_dict(raw, path)
    write_json(path, raw)
    return cal
