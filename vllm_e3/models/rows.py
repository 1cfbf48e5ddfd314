"""The rows of one forward: which request each belongs to, and each row's exit
rules as the compiled stages read them.

Glossary
- row: one token of the flattened batch the model's forward sees; rows map to
  requests through the attention metadata's `query_start_loc`.
- decode row: the single new token of a request whose prompt is done; only
  decode rows may exit (prompt tokens run the whole model).
- active rows: the rows a stage runs, in ascending forward-row order (the
  order the attention metadata lists their requests in).
- effective threshold: a row's threshold at an exit with everything the host
  knows before the forward folded in: +inf where the row may not exit there
  (a prompt row, a request under policy `full`, no threshold), -inf / +inf
  where the synthetic profile's draw (vllm_e3.models.draws) says it leaves /
  stays, NaN for padding rows. A stage's graph compares its confidence with
  it (`confidence >= threshold`), so one graph serves every request.

Everything here is built on the host once per step, before the forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..knobs import FULL_RULES
from .draws import audit_key, uniform

INF = float("inf")


@dataclass
class RowLayout:
    """How the rows of one forward map to requests."""
    num_rows: int                  # real (unpadded) tokens
    query_start_loc: torch.Tensor  # [R + 1] int32
    req_of_row: torch.Tensor       # [num_rows] int64
    decode_row: torch.Tensor       # [num_rows] bool: may exit
    num_decode: int                # decode rows
    decode_only: bool              # every request has one row, a decode row: row i is request i

    @property
    def num_reqs(self) -> int:
        return self.query_start_loc.numel() - 1

    @property
    def num_prompt_rows(self) -> int:
        return self.num_rows - self.num_decode

    @classmethod
    def build(cls, query_start_loc: torch.Tensor, positions: torch.Tensor,
              prompt_lens: torch.Tensor | None) -> "RowLayout":
        """`query_start_loc` [R + 1] (CPU) of the step's R requests;
        `positions` [>= num_rows]; `prompt_lens` [R] (None: no row is a
        decode row). A decode row is its request's only row of the step and
        lies past the prompt: a 1-token chunk of a chunked prefill and the
        recomputed last token of a fully cached prompt are prompt positions,
        which run every layer."""
        qsl = query_start_loc
        qlen = (qsl[1:] - qsl[:-1]).long()
        n = int(qsl[-1])
        req_of_row = torch.repeat_interleave(torch.arange(qlen.numel()), qlen)
        if prompt_lens is None or prompt_lens.numel() < qlen.numel():
            decode = torch.zeros(n, dtype=torch.bool)
        else:
            past_prompt = positions[:n].long() >= prompt_lens[:qlen.numel()][req_of_row]
            decode = (qlen == 1)[req_of_row] & past_prompt
        num_decode = int(decode.sum())
        return cls(n, qsl, req_of_row, decode, num_decode, num_decode == qlen.numel() == n)

    @classmethod
    def from_step(cls, step, positions: torch.Tensor) -> "RowLayout":
        """The rows of the step's requests (`step.req_ids`; padding requests
        the runner may add are left out), from the common attention
        metadata the runner captured."""
        cm = step.attn.first()
        qsl = cm.query_start_loc_cpu[:len(step.req_ids) + 1]
        return cls.build(qsl, positions, step.prompt_lens)


@dataclass
class ExitPlan:
    """Per-row exit rules of one step, from the engine's E3Config and the
    requests' rules (resolved at admission, vllm_e3.knobs). Rows index the
    forward's rows, padding included."""
    thr: torch.Tensor            # [N, E] fp32 effective thresholds, one column per exit (cfg.exits)
    sync: bool                   # the step follows policy `sync`
    kv_fill: torch.Tensor        # [N] bool: the row's request fills the K/V it skipped
    fill_all: bool               # every request fills (a test override may turn it off)
    may_park: torch.Tensor       # [N] bool: decode row under policy e3 (and refill allows)
    audit: torch.Tensor | None   # [N, E] bool: drawn for the online audit, if it runs
    parks_any: bool              # some row may park
    parks_all: bool              # every decode row may park

    @classmethod
    def build(cls, cfg, layout: RowLayout, n_rows: int, step, positions: torch.Tensor,
              tokens: torch.Tensor | None) -> "ExitPlan":
        """From each request's rules. `positions`, `tokens` [N]: the draws of
        the synthetic profile and of the audit hash them (tensor ops, no host
        read)."""
        num_reqs, E = layout.num_reqs, len(cfg.exits)
        rules = step.rules[:num_reqs] if step is not None and len(step.rules) >= num_reqs else None
        rules = rules or [FULL_RULES] * num_reqs
        pad = n_rows - layout.num_rows
        req = layout.req_of_row

        def per_row(values, dtype, pad_value):
            t = torch.tensor(values, dtype=dtype)[req]
            return torch.cat([t, torch.full((pad, *t.shape[1:]), pad_value, dtype=dtype)]) if pad else t

        nan = float("nan")
        may_exit = per_row([r.policy != "full" for r in rules], torch.bool, False)
        decode = torch.cat([layout.decode_row, torch.zeros(pad, dtype=torch.bool)]) if pad else layout.decode_row
        may_exit &= decode
        thr = per_row([[r.thresholds.get(e, INF) for e in cfg.exits] for r in rules], torch.float32, nan)
        thr = torch.where(may_exit[:, None] | thr.isnan(), thr, INF)
        if any(e in r.force_exit for r in rules for e in cfg.exits):
            _fold_draws(thr, cfg, rules, layout, may_exit, positions, tokens)
        audit = None
        if cfg.audit_rate > 0.0 and E and layout.num_decode:
            audit = _audit_draws(cfg, layout, may_exit, n_rows, positions, tokens)
        sync = num_reqs > 0 and all(r.policy == "sync" for r in rules)
        # parking needs the E3 runner (step context) to reschedule the request,
        # and under park_when "refill" a scheduler that can admit in its place
        park = [r.policy == "e3" and step is not None and (r.park_when == "always" or step.refill) for r in rules]
        may_park = per_row(park, torch.bool, False) & decode
        parks_any = any(park) and layout.num_decode > 0
        parks_all = parks_any and all(park)
        fill = [r.kv_fill for r in rules]
        return cls(thr, sync, per_row(fill, torch.bool, True), all(fill), may_park, audit, parks_any, parks_all)


def _fold_draws(thr, cfg, rules, layout, may_exit, positions, tokens) -> None:
    """The synthetic profile's rows: -inf where the draw leaves, +inf where it
    stays; every row and exit in one vectorised hash, no host read."""
    n = layout.num_rows
    nan = float("nan")
    rate = torch.tensor([[r.force_exit.get(e, nan) for e in cfg.exits] for r in rules],
                        dtype=torch.float64)[layout.req_of_row]
    u = uniform(cfg.seed, tuple(cfg.exits), positions[:n, None], tokens[:n, None])
    drawn = may_exit[:n, None] & ~rate.isnan()
    thr[:n] = torch.where(drawn, torch.where(u < rate, -INF, INF).float(), thr[:n])


def _audit_draws(cfg, layout, may_exit, n_rows, positions, tokens) -> torch.Tensor:
    n = layout.num_rows
    out = torch.zeros(n_rows, len(cfg.exits), dtype=torch.bool)
    u = uniform(audit_key(cfg.seed), tuple(cfg.exits), positions[:n, None], tokens[:n, None])
    out[:n] = may_exit[:n, None] & (u < cfg.audit_rate)
    return out


@dataclass
class Parked:
    """A token waiting at the start of stage `start` (policy e3)."""
    start: int                # exit point where it resumes
    h: torch.Tensor           # [d] pre-ramp hidden after layer start-1
    residual: torch.Tensor    # [d]
    position: int
    token: int
    waited: int               # steps waited so far, this one included
