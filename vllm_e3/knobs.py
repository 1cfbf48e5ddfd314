"""Per-request rules: the user's quality knobs, the engine's test-only
overrides, and their resolution into one `RequestRules` per request.

Knobs (the API), in vLLM's own way: `vllm_xargs` in an OpenAI request
(`extra_body={"vllm_xargs": {...}}`) or `SamplingParams.extra_args` offline.

- `e3_enabled`: true/false, also 1/0 (`vllm_xargs` turns JSON booleans into
  integers). Off: this request runs the full model, whatever the engine's
  policy.
- `e3_target_agreement`: a float in (0, 1]. This request exits with the
  thresholds that the model's calibration table (`<model>/e3/calibration.json`,
  written by `vllm-e3 calibrate`) gives for the least strict target >= it
  whose exits this engine runs and whose confidence measure it scores; no such
  row (e.g. 1.0): the full model, which agrees with itself.

Test overrides (not an API): one key, `_e3_test`, whose value is an object
`{"policy": ..., "force_exit": {exit: rate}, "kv_fill": bool, "park_when": ...}`.
They let one engine serve many test and benchmark cases (an engine takes
~25 s to start). They are accepted only by an engine started with the E3
config key `test_overrides: true`, and only offline: `vllm_xargs` cannot
carry an object, so over HTTP every `_e3*` key is refused, switch or not.
Any other key that starts with `_e3` is refused too.

Validation happens in the front end, before the request reaches the engine:
`E3RequestParams.validate_params` is the `validate_params` hook of a vLLM
logits processor that `--model-impl e3` adds to the engine
(patches/patch_arg_utils.py). vLLM turns its `ValueError` into HTTP 400 (and
raises it from `LLM.generate` offline); the processor never changes logits.
Resolution happens once per request, when the worker admits it
(`vllm_e3.worker`, `resolve_rules`): the stage loop reads the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.v1.sample.logits_processor import LogitsProcessor

from .config import POLICIES

if TYPE_CHECKING:
    from .calibration import Calibration

KNOBS = ("e3_enabled", "e3_target_agreement")
TEST_KEY = "_e3_test"
TEST_FIELDS = ("policy", "force_exit", "kv_fill", "park_when")
PARK_WHEN = ("refill", "always")


@dataclass(frozen=True)
class Knobs:
    enabled: bool = True
    target: float | None = None


@dataclass(frozen=True)
class TestOverrides:
    """`extra_args["_e3_test"]`, validated. None: the engine's setting."""
    policy: str | None = None
    force_exit: dict[int, float] | None = None    # exit point -> rate in [0, 1]
    kv_fill: bool = True                          # False: leave holes (tests show they matter)
    park_when: str | None = None


def _bad(name: str, want: str, got: Any) -> ValueError:
    shown = repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ValueError(f"vllm_xargs field {name!r} must be {want}, got {shown}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_knobs(extra: dict[str, Any] | None) -> Knobs:
    """The request's knobs; ValueError naming the field on bad input."""
    if not extra:
        return Knobs()
    unknown = sorted(k for k in extra if isinstance(k, str) and k.startswith("e3_") and k not in KNOBS)
    if unknown:
        raise ValueError(f"unknown vllm_xargs field(s) {unknown[:5]}; vllm-e3 knows {list(KNOBS)}")
    enabled = extra.get("e3_enabled", True)
    if not (isinstance(enabled, bool) or (type(enabled) is int and enabled in (0, 1))):
        raise _bad("e3_enabled", "true/false or 1/0", enabled)
    target = extra.get("e3_target_agreement")
    if target is not None:
        if not _is_number(target) or not 0.0 < target <= 1.0:
            raise _bad("e3_target_agreement", "a number in (0, 1]", target)
        target = float(target)
    return Knobs(bool(enabled), target)


def parse_test_overrides(extra: dict[str, Any] | None, *, allowed: bool,
                         exits: tuple[int, ...] | None = None) -> TestOverrides | None:
    """The request's test overrides, or None. ValueError naming the key when
    any `_e3*` key is present on an engine without `test_overrides`, or when
    the object or a field of it is malformed; `exits` (when known) bounds
    `force_exit`'s keys."""
    if not extra:
        return None
    keys = sorted(k for k in extra if isinstance(k, str) and k.startswith("_e3"))
    if not keys:
        return None
    if not allowed:
        raise ValueError(
            f"vllm_xargs field {keys[0]!r} is a vllm-e3 test-only override and this engine refuses it "
            f"(it was not started with the E3 config key 'test_overrides': true, which is for tests only)")
    other = [k for k in keys if k != TEST_KEY]
    if other:
        raise ValueError(f"unknown vllm-e3 test override key {other[0]!r}: test overrides go in "
                         f"SamplingParams.extra_args[{TEST_KEY!r}] = {{{', '.join(TEST_FIELDS)}}}")
    raw = extra[TEST_KEY]
    if not isinstance(raw, dict):
        raise _bad(TEST_KEY, "an object (offline SamplingParams.extra_args only; vllm_xargs cannot carry one)",
                   raw)
    unknown = sorted(str(k) for k in raw if k not in TEST_FIELDS)
    if unknown:
        raise ValueError(f"{TEST_KEY}: unknown field(s) {unknown[:5]}; known: {list(TEST_FIELDS)}")
    policy = raw.get("policy")
    if policy is not None and policy not in POLICIES:
        raise _bad(f"{TEST_KEY}.policy", f"one of {list(POLICIES)}", policy)
    park_when = raw.get("park_when")
    if park_when is not None and park_when not in PARK_WHEN:
        raise _bad(f"{TEST_KEY}.park_when", f"one of {list(PARK_WHEN)}", park_when)
    kv_fill = raw.get("kv_fill", True)
    if not isinstance(kv_fill, bool):
        raise _bad(f"{TEST_KEY}.kv_fill", "true or false", kv_fill)
    force = raw.get("force_exit")
    if force is not None:
        if not isinstance(force, dict):
            raise _bad(f"{TEST_KEY}.force_exit", "an object {exit point: rate}", force)
        parsed = {}
        for k, rate in force.items():
            try:
                e = int(k)
            except (TypeError, ValueError):
                raise _bad(f"{TEST_KEY}.force_exit", "keyed by exit points", k) from None
            if exits is not None and e not in exits:
                raise _bad(f"{TEST_KEY}.force_exit", f"keyed by this engine's exit points {list(exits)}", k)
            if not _is_number(rate) or not 0.0 <= rate <= 1.0:
                raise _bad(f"{TEST_KEY}.force_exit[{e}]", "a rate in [0, 1]", rate)
            parsed[e] = float(rate)
        force = dict(sorted(parsed.items()))
    return TestOverrides(policy, force, kv_fill, park_when)


@dataclass(frozen=True)
class RequestRules:
    """How one request may exit, resolved once when the worker admits it."""
    policy: str                                   # "full": never exits
    thresholds: dict[int, float] = field(default_factory=dict)   # exit -> threshold (exits that fire)
    force_exit: dict[int, float] = field(default_factory=dict)   # exit -> synthetic rate
    kv_fill: bool = True
    park_when: str = "refill"


FULL_RULES = RequestRules("full")


def resolve_rules(cfg, table: "Calibration | None", extra: dict[str, Any] | None) -> RequestRules:
    """The rules of a request under the engine's E3 config `cfg` (after any
    start-up plan) and calibration `table`. Input the front end refused never
    gets here; should it, the request runs the full model (never exit on
    doubt)."""
    thresholds = {e: t for e, t in zip(cfg.exits, cfg.thresholds) if t is not None}
    rules = RequestRules(cfg.policy, thresholds, dict(cfg.force_exit), True, cfg.park_when)
    if not extra:
        return rules
    try:
        knobs = parse_knobs(extra)
        test = parse_test_overrides(extra, allowed=cfg.test_overrides)
    except ValueError:
        return FULL_RULES
    if not knobs.enabled:
        rules = FULL_RULES
    elif knobs.target is not None:
        t = table.thresholds_for(knobs.target, cfg.exits, cfg.confidence) if table else None
        rules = FULL_RULES if t is None else RequestRules(cfg.policy, t, rules.force_exit, True, cfg.park_when)
    if test is not None:
        rules = RequestRules(test.policy or rules.policy,
                             rules.thresholds,
                             rules.force_exit if test.force_exit is None else test.force_exit,
                             test.kv_fill,
                             test.park_when or rules.park_when)
    return rules


# Front-end state for `validate_params`, a classmethod that vLLM calls with
# the request alone. Each engine gets its own processor class: the
# create_engine_config wrapper names it with `processor_fqcn(state)`, the
# state spelled into the class name, and this module's `__getattr__` makes
# the class from the name (in any process: the engine processes load it by
# name too). Two engines in one process (tests, several LLM objects) keep
# their own rules; there is no process-wide "last engine".
@dataclass(frozen=True)
class FrontendState:
    has_table: bool = False                 # the model has e3/calibration.json
    test_overrides: bool = False            # E3Config.test_overrides
    exits: tuple[int, ...] | None = None    # the configured exit points

    def tag(self) -> str:
        exits = "_".join(str(e) for e in self.exits) if self.exits else "none"
        return f"t{int(self.has_table)}o{int(self.test_overrides)}x{exits}"

    @classmethod
    def from_tag(cls, tag: str) -> "FrontendState":
        import re

        m = re.fullmatch(r"t([01])o([01])x(none|\d+(?:_\d+)*)", tag)
        if m is None:
            raise AttributeError(f"module {__name__!r} has no attribute {_PROCESSOR + '__' + tag!r}")
        exits = None if m[3] == "none" else tuple(int(e) for e in m[3].split("_"))
        return cls(m[1] == "1", m[2] == "1", exits)


_PROCESSOR = "E3RequestParams"


def is_processor(fqcn) -> bool:
    """Whether a `logits_processors` entry is one of ours (any state)."""
    return isinstance(fqcn, str) and fqcn.split("__")[0] == f"{__name__}:{_PROCESSOR}"


def processor_fqcn(has_table: bool, cfg) -> str:
    """The `logits_processors` entry of an engine with this E3 config and
    (or without) a calibration table."""
    state = FrontendState(bool(has_table), bool(cfg.test_overrides), tuple(cfg.exits))
    return f"{__name__}:{_PROCESSOR}__{state.tag()}"


class E3RequestParams(LogitsProcessor):
    """Carries vllm-e3's per-request validation into vLLM's admission path;
    leaves logits alone. `state` None (the bare class): no engine config
    known, so no test overrides and no table check."""

    state: FrontendState | None = None

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = sampling_params.extra_args
        state = cls.state or FrontendState()
        knobs = parse_knobs(extra)
        parse_test_overrides(extra, allowed=state.test_overrides, exits=state.exits)
        if knobs.target is not None and cls.state is not None and not state.has_table:
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


_classes: dict[str, type] = {}


def __getattr__(name: str):
    """`E3RequestParams__<tag>`: the processor class of one engine's state
    (PEP 562; made once per name and process)."""
    head, sep, tag = name.partition("__")
    if head != _PROCESSOR or not sep:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _classes:
        _classes[name] = type(name, (E3RequestParams,), {"state": FrontendState.from_tag(tag),
                                                         "__module__": __name__})
    return _classes[name]
