"""Per-request quality knobs, in vLLM's own way: `vllm_xargs` in an OpenAI
request (`extra_body={"vllm_xargs": {...}}`) or `SamplingParams.extra_args`
offline.

- `e3_enabled`: true/false, also 1/0 (`vllm_xargs` turns JSON booleans into
  integers). Off: this request runs the full model, whatever the engine's
  policy.
- `e3_target_agreement`: a float in (0, 1]. This request exits with the
  thresholds that the model's calibration table (`<model>/e3/calibration.json`,
  written by `vllm-e3 calibrate`) gives for the least strict target >= it
  whose exits this engine runs and whose confidence measure it scores; no such
  row (e.g. 1.0): the full model, which agrees with itself.

Validation happens in the front end, before the request reaches the engine:
`E3RequestParams.validate_params` is the `validate_params` hook of a vLLM
logits processor that `--model-impl e3` adds to the engine
(patches/patch_arg_utils.py). vLLM turns its `ValueError` into HTTP 400; the
processor itself never changes logits. Keys that start with `_e3_` are the
test-only overrides of `vllm_e3.step`, not knobs.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from vllm.v1.sample.logits_processor import LogitsProcessor

KNOBS = ("e3_enabled", "e3_target_agreement")
PROCESSOR_FQCN = "vllm_e3.knobs:E3RequestParams"


@dataclass(frozen=True)
class Knobs:
    enabled: bool = True
    target: float | None = None


def parse_knobs(extra: dict[str, Any] | None) -> Knobs:
    """The request's knobs; ValueError naming the field on bad input."""
    if not extra:
        return Knobs()
    unknown = sorted(k for k in extra if k.startswith("e3_") and k not in KNOBS)
    if unknown:
        raise ValueError(f"unknown vllm_xargs field(s) {unknown}; vllm-e3 knows {list(KNOBS)}")
    enabled = extra.get("e3_enabled", True)
    if enabled not in (True, False, 0, 1) or isinstance(enabled, float):
        raise ValueError(f"vllm_xargs field 'e3_enabled' must be true/false or 1/0, got {enabled!r}")
    target = extra.get("e3_target_agreement")
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not (
                math.isfinite(target) and 0.0 < target <= 1.0):
            raise ValueError(
                f"vllm_xargs field 'e3_target_agreement' must be a number in (0, 1], got {target!r}")
        target = float(target)
    return Knobs(bool(enabled), target)


@dataclass(frozen=True)
class TableRow:
    target: float
    measure: str | None              # None: the row says policy full
    thresholds: dict[int, float]     # exit point -> threshold, exits that fire only


class CalibrationTable:
    """The `table` of calibration.json, for per-request targets."""

    def __init__(self, rows: list[TableRow], source: str):
        self.rows = sorted(rows, key=lambda r: r.target)
        self.source = source

    @classmethod
    def load(cls, path: str) -> "CalibrationTable | None":
        if not os.path.isfile(path):
            return None
        raw = json.load(open(path))
        exits = raw["exits"]
        rows = []
        for r in raw["table"]:
            chosen = r.get("chosen") or {}
            if r.get("policy") == "full" or not chosen:
                rows.append(TableRow(float(r["target_agreement"]), None, {}))
                continue
            thr = {e: float(t) for e, t in zip(exits, chosen["thresholds"]) if t is not None}
            rows.append(TableRow(float(r["target_agreement"]), chosen["measure"], thr))
        return cls(rows, path)

    def thresholds_for(self, target: float, exits: tuple[int, ...], measure: str) -> dict[int, float] | None:
        """Thresholds (exit -> threshold) for a request asking for `target`,
        or None: run the full model. Only rows this engine can honour exactly
        (their exits among the engine's, their measure the engine's) count;
        a row that exits nowhere means the full model."""
        for row in self.rows:
            if row.target < target:
                continue
            if not row.thresholds:
                return None
            if row.measure == measure and set(row.thresholds) <= set(exits):
                return row.thresholds
        return None


# Front-end state for `validate_params` (a classmethod: vLLM gives it no
# engine). Set by the create_engine_config wrapper for each `--model-impl e3`
# engine; one API server process serves one engine.
_frontend_has_table: bool | None = None


def set_frontend_table(path: str | None) -> None:
    global _frontend_has_table
    _frontend_has_table = path is not None and os.path.isfile(path)


class E3RequestParams(LogitsProcessor):
    """Carries vllm-e3's per-request validation into vLLM's admission path;
    leaves logits alone."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        knobs = parse_knobs(sampling_params.extra_args)
        if knobs.target is not None and _frontend_has_table is False:
            raise ValueError(
                "vllm_xargs field 'e3_target_agreement' needs a calibration table, and this model has "
                "none (run `vllm-e3 calibrate MODEL_DIR` to write e3/calibration.json)")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass
