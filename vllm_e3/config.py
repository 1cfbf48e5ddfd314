"""`E3Config`: the one typed configuration of an E3 deployment.

Read once from `<model_dir>/e3/config.json` and deep-merged with the
deployment's `additional_config["e3"]` (`--additional-config '{"e3": {...}}'`
or `LLM(..., additional_config={"e3": {...}})`); the deployment wins key by
key. A model directory without `e3/` runs policy `full`. Unknown keys, bad
values and exit points that do not fit the model are errors that name the
problem (raised before an engine starts: see patches/patch_arg_utils.py).

Glossary (docs/design.md): an exit point `e` reads the state after decoder
layer `e-1`; a stage is the layers between two consecutive exit points; a token
exits at the first exit whose confidence >= that exit's threshold, and a
threshold of `None` never fires.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

E3_DIRNAME = "e3"
CONFIG_FILENAME = "config.json"
RAMPS_FILENAME = "ramps.safetensors"
CALIBRATION_FILENAME = "calibration.json"

POLICIES = ("full", "sync", "token", "e3")
CONFIDENCE_MEASURES = ("max_prob", "margin", "gate")
# max_prob over the first K ids of the calibration's shortlist (the tokens the
# model served most on the training corpus): "shortlist@K"
SHORTLIST = "shortlist@"


def shortlist_k(measure: str) -> int | None:
    """K of a "shortlist@K" measure (K >= 1), else None."""
    if not isinstance(measure, str) or not measure.startswith(SHORTLIST):
        return None
    k = measure[len(SHORTLIST):]
    return int(k) if k.isdigit() and int(k) >= 1 else None


def known_measure(measure) -> bool:
    return measure in CONFIDENCE_MEASURES or shortlist_k(measure) is not None


class E3ConfigError(ValueError):
    """A configuration or artifact problem, reported before the engine starts."""


@dataclass(frozen=True)
class E3Config:
    # full: no exits (identical to vanilla vLLM); sync: a batch stops at an
    # exit only if every token exits there; token: per-token exits with
    # compaction and KV fill; e3: token + parking/regrouping.
    policy: str = "full"
    # Exit points, strictly increasing, each in [1, num_layers - 1].
    exits: tuple[int, ...] = ()
    # One per exit, in [0, 1], or None (that exit never fires). Defaults to
    # all None.
    thresholds: tuple[float | None, ...] = ()
    # How confidence is scored: max softmax probability, top-1/top-2
    # probability margin, the ramp's learned gate, or "shortlist@K": max
    # softmax probability over the first K ids of the shortlist in
    # e3/calibration.json (the head reads K of its V rows).
    confidence: str = "max_prob"
    # Synthetic exit profile for tests and benchmarks: {exit point: rate}.
    # Replaces the confidence test by the deterministic decision of
    # `vllm_e3.models.draws.forced_exit_u` < rate.
    force_exit: dict[int, float] = field(default_factory=dict)
    # Seed of the synthetic profile's hash.
    seed: int = 0
    # Policy e3: a stage runs only when at least this many tokens would run it
    # (an int for every stage after the first, or one per exit point: the
    # stage that starts there); smaller groups park and resume later.
    target_batch: int | tuple[int, ...] = 32
    # Policy e3: the most steps one token may wait parked, in total.
    max_park_steps: int = 4
    # Policy e3: park only while the scheduler can refill the first stage
    # ("refill": requests are waiting and runner slots are free), or
    # whenever a group is below target ("always"). Without a refill a parked
    # request only moves a small batch from a later stage to the first.
    park_when: str = "refill"
    # Run the planner (vllm_e3.planner) when the model loads: measure stage
    # costs on this machine and keep the exits, policy (no stronger than
    # `policy`) and target batch that pay for the engine's batch and slots.
    plan: bool = False
    # The plan's latency bound: policy e3 is chosen only if its modelled time
    # per output token is at most this many times token's (parked tokens
    # wait steps; null: no bound). The planner models TPOT, it does not
    # measure it (benchmarks/RESULTS.md compares the two).
    max_tpot_ratio: float | None = None
    # Online audit: this fraction of exited decode tokens (drawn by a hash of
    # position and token, as `force_exit` draws) also runs the layers it
    # skipped, and its ramp's top-1 is compared with the full model's
    # (`vllm_e3:audit_*` on /metrics, with a Clopper-Pearson bound). The
    # output is the exit's either way (the KV fill still writes the skipped
    # layers), so the audit measures the deployment without changing it.
    # Each audited token costs the layers it skipped plus two head rows.
    audit_rate: float = 0.0
    # TESTS AND BENCHMARKS ONLY. Accept the per-request test overrides
    # (`SamplingParams.extra_args["_e3_test"]`, vllm_e3.knobs): a synthetic
    # exit profile, another policy, no KV fill. Off, every `_e3*` key is
    # refused at admission; on or off, HTTP clients cannot send them.
    test_overrides: bool = False

    # ---- construction -------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "e3 config") -> "E3Config":
        if not isinstance(raw, dict):
            raise E3ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise E3ConfigError(
                f"{source}: unknown key(s) {unknown}; known keys are {sorted(known)}"
            )
        kw: dict[str, Any] = dict(raw)
        policy = kw.get("policy", "full")
        if policy not in POLICIES:
            raise E3ConfigError(f"{source}: unknown policy {policy!r}; choose one of {list(POLICIES)}")
        exits = kw.get("exits", [])
        if not isinstance(exits, (list, tuple)) or not all(
            isinstance(e, int) and not isinstance(e, bool) for e in exits
        ):
            raise E3ConfigError(f"{source}: 'exits' must be a list of integers, got {exits!r}")
        kw["exits"] = tuple(exits)
        if list(kw["exits"]) != sorted(set(kw["exits"])):
            raise E3ConfigError(
                f"{source}: exit points must be strictly increasing without duplicates, got {list(exits)}"
            )
        thresholds = kw.get("thresholds")
        if thresholds is None:
            thresholds = [None] * len(exits)
        if not isinstance(thresholds, (list, tuple)) or len(thresholds) != len(exits):
            raise E3ConfigError(
                f"{source}: 'thresholds' must be a list with one entry per exit "
                f"({len(exits)}), got {thresholds!r}"
            )
        for e, t in zip(exits, thresholds):
            if t is None:
                continue
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
                raise E3ConfigError(
                    f"{source}: threshold for exit {e} must be in [0, 1] or null, got {t!r}"
                )
        kw["thresholds"] = tuple(None if t is None else float(t) for t in thresholds)
        conf = kw.get("confidence", "max_prob")
        if not known_measure(conf):
            raise E3ConfigError(
                f"{source}: unknown confidence measure {conf!r}; choose one of {list(CONFIDENCE_MEASURES)} "
                f"or {SHORTLIST}K (max_prob over the calibration's K-token shortlist)"
            )
        kw["force_exit"] = _parse_force_exit(kw.get("force_exit") or {}, exits, source)
        tb = kw.get("target_batch", 32)
        if isinstance(tb, list):
            if len(tb) != len(exits) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tb):
                raise E3ConfigError(
                    f"{source}: 'target_batch' must be a non-negative integer or a list of one per exit, got {tb!r}")
            kw["target_batch"] = tuple(tb)
        elif isinstance(tb, bool) or not isinstance(tb, int) or tb < 0:
            raise E3ConfigError(f"{source}: 'target_batch' must be a non-negative integer, got {tb!r}")
        mps = kw.get("max_park_steps", 4)
        if isinstance(mps, bool) or not isinstance(mps, int) or mps < 0:
            raise E3ConfigError(f"{source}: 'max_park_steps' must be a non-negative integer, got {mps!r}")
        mtr = kw.get("max_tpot_ratio")
        if mtr is not None and (isinstance(mtr, bool) or not isinstance(mtr, (int, float))
                                or not 1.0 <= mtr < float("inf")):
            raise E3ConfigError(f"{source}: 'max_tpot_ratio' must be a number >= 1 or null, got {mtr!r}")
        if mtr is not None:
            kw["max_tpot_ratio"] = float(mtr)
        for flag in ("plan", "test_overrides"):
            if not isinstance(kw.get(flag, False), bool):
                raise E3ConfigError(f"{source}: {flag!r} must be true or false, got {kw[flag]!r}")
        if kw.get("plan") and policy not in ("full", "token", "e3"):
            raise E3ConfigError(f"{source}: 'plan' chooses among policies full, token and e3; "
                                f"policy {policy!r} is not modelled")
        if kw.get("park_when", "refill") not in ("refill", "always"):
            raise E3ConfigError(f"{source}: 'park_when' must be 'refill' or 'always', "
                                f"got {kw['park_when']!r}")
        ar = kw.get("audit_rate", 0.0)
        if isinstance(ar, bool) or not isinstance(ar, (int, float)) or not 0.0 <= ar <= 1.0:
            raise E3ConfigError(f"{source}: 'audit_rate' must be a number in [0, 1], got {ar!r}")
        kw["audit_rate"] = float(ar)
        seed = kw.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise E3ConfigError(f"{source}: 'seed' must be an integer, got {seed!r}")
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["exits"] = list(self.exits)
        d["thresholds"] = list(self.thresholds)
        d["force_exit"] = {str(k): v for k, v in self.force_exit.items()}
        d["target_batch"] = self.target_batch if isinstance(self.target_batch, int) else list(self.target_batch)
        return d

    # ---- checks against the model --------------------------------------
    def validate_for_model(self, num_layers: int, exits=None, whose: str = "") -> None:
        for e in self.exits if exits is None else exits:
            if not 1 <= e <= num_layers - 1:
                raise E3ConfigError(
                    f"{whose + ' ' if whose else ''}exit point {e} is out of range: the model has {num_layers} decoder "
                    f"layers, so exit points must lie in [1, {num_layers - 1}]"
                )

    @property
    def exits_active(self) -> bool:
        """Can any token exit at all under this configuration?"""
        # Per-request knobs can turn thresholds on, so any exit under a
        # non-full policy makes the stage loop run.
        return self.policy != "full" and bool(self.exits)

    def target_at(self, e: int) -> int:
        """Target batch of the stage that starts at exit point `e`."""
        tb = self.target_batch
        return tb if isinstance(tb, int) else tb[self.exits.index(e)]

    def stages(self, num_layers: int) -> list[tuple[int, int]]:
        """Layer ranges [start, end) between consecutive exit points."""
        bounds = [0, *self.exits, num_layers]
        return list(zip(bounds[:-1], bounds[1:]))


def _parse_force_exit(raw: Any, exits, source: str) -> dict[int, float]:
    if not isinstance(raw, dict):
        raise E3ConfigError(f"{source}: 'force_exit' must be an object {{exit point: rate}}, got {raw!r}")
    out: dict[int, float] = {}
    for k, rate in raw.items():
        try:
            e = int(k)
        except (TypeError, ValueError):
            raise E3ConfigError(f"{source}: force_exit key {k!r} is not an exit point") from None
        if e not in exits:
            raise E3ConfigError(
                f"{source}: force_exit names exit {e}, which is not in 'exits' {list(exits)}"
            )
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise E3ConfigError(f"{source}: force_exit rate for exit {e} must be in [0, 1], got {rate!r}")
        out[e] = float(rate)
    return dict(sorted(out.items()))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge `override` into a copy of `base`, recursing into nested objects."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def e3_dir(model_dir: str) -> str:
    return os.path.join(model_dir, E3_DIRNAME)


def load_e3_config(model_dir: str, overrides: dict[str, Any] | None = None) -> E3Config:
    """The deployment's E3Config: `<model_dir>/e3/config.json` <- overrides."""
    path = os.path.join(e3_dir(model_dir), CONFIG_FILENAME)
    raw: dict[str, Any] = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise E3ConfigError(f"cannot read E3 config {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise E3ConfigError(f"{path}: expected a JSON object")
    if overrides:
        if not isinstance(overrides, dict):
            raise E3ConfigError(f"additional_config['e3'] must be an object, got {overrides!r}")
        raw = deep_merge(raw, overrides)
    # The file's thresholds, confidence measure and synthetic profile belong to
    # its exits: an override of `exits` drops those it does not give itself.
    if overrides and "exits" in overrides:
        for key in ("thresholds", "confidence", "force_exit"):
            if key not in overrides:
                raw.pop(key, None)
    return E3Config.from_dict(raw, source=path if not overrides else f"{path} + additional_config['e3']")


def e3_config_from_vllm(vllm_config) -> E3Config:
    """E3Config of a built `VllmConfig` (model path + additional_config)."""
    model_dir = vllm_config.model_config.model
    extra = (vllm_config.additional_config or {}).get("e3")
    return load_e3_config(model_dir, extra)
