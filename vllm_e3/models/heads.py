"""Exit heads: at exit point `e`, the ramp, the final norm and the confidence
that decide which rows leave, as one module a compiled stage runs at its end.

    head_in    = final_norm(ramp(hidden + residual))       [n, d]  what the LM head reads
    confidence = gate(head_in)                              CALM's classifier (`gate`)
               | max_prob / margin over the head's rows     the whole vocabulary
               | max_prob over the shortlist's K rows       `shortlist@K`
               | 0                                          no row is ever scored
    leave      = confidence >= threshold                    per row (vllm_e3.models.rows:
                                                            -inf forced out, +inf never,
                                                            NaN padding)
    sync       : leave only if every real row leaves

Each exit's head is built once, with the model, and knows its measure: there
is no lazy state and no change of measure on the hot path. The scorer is
chosen at start-up:
- `gate`: the ramp's learned gate (the ramps file must have one);
- the vocabulary (`max_prob`, `margin`): the LM head's rows of this tensor-
  parallel rank, read through the head module at call time (vLLM may replace
  its weight after loading); the ranks' partial statistics are all-gathered
  and merged (vllm_e3.models.parallel), so every rank decides the same;
- `shortlist@K`: K head rows copied once while the weights load (before
  vLLM's CPU path may repack the head);
- none: an engine with no threshold anywhere and no calibration table can
  never score a row (only the synthetic profile's draws decide), so its
  stages skip the confidence. The head input is still computed: exited rows
  hand it to the LM head.

`tag` names all of this for the stage class's qualname (the compile cache
key, vllm_e3/models/stage.py).
"""
from __future__ import annotations

import torch
from torch import nn

from .parallel import VocabShard


class GateScorer(nn.Module):
    """sigmoid(head_in @ gate.weight^T + gate.bias), in fp32 (the ramp's gate)."""

    def __init__(self, ramp):
        super().__init__()
        self.ramp = ramp

    def forward(self, head_in: torch.Tensor) -> torch.Tensor:
        w, b = self.ramp.gate_weight, self.ramp.gate_bias
        return torch.sigmoid(head_in.float() @ w[0].float() + b.float())


class VocabScorer(nn.Module):
    """max_prob / margin over this rank's head rows, merged across ranks.

    With `lm_head` (vLLM's ParallelLMHead) its rows are read at call time.
    Otherwise `rows` [k, d] is a copy the model fills while the weights load
    -- the shortlist's rows of this shard, `ids` [k] their vocabulary ids, or
    a pipeline rank's own copy of the whole head (`ids` None)."""

    def __init__(self, measure: str, lm_head=None, rows: int = 0, d: int = 0, ids=None, group=None,
                 dtype=torch.float32):
        super().__init__()
        self.measure = measure
        self.lm_head = lm_head                         # the model's own module (shared), or None
        self.group = group
        self.rows = None if lm_head is not None else nn.Parameter(torch.zeros(rows, d, dtype=dtype),
                                                                   requires_grad=False)
        self.register_buffer("ids", None if ids is None else ids.clone(), persistent=False)

    def shard(self) -> VocabShard:
        if self.lm_head is None:
            return VocabShard(self.rows, self.ids, 0, self.group)
        idx = self.lm_head.shard_indices
        return VocabShard(self.lm_head.weight[:idx.num_org_elements], None, idx.org_vocab_start_index,
                          self.group)

    def forward(self, head_in: torch.Tensor) -> torch.Tensor:
        return self.shard().score(head_in, self.measure)


class ExitHead(nn.Module):
    """One exit's decision (module docstring). `column`: the exit's column of
    the per-row threshold matrix."""

    def __init__(self, exit_point: int, column: int, ramp, norm, scorer: nn.Module | None, tag: str):
        super().__init__()
        self.exit_point, self.column, self.tag = exit_point, column, tag
        self.ramp = ramp
        self.norm = norm                               # the model's final norm (or a PP rank's copy)
        self.scorer = scorer

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        # x [n, d]: hidden + residual after layer e-1
        return self.norm(self.ramp(x))

    def decide(self, x: torch.Tensor, thr: torch.Tensor, sync: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(head_in [n, d], leave [n] bool) for pre-ramp states `x` [n, d],
        thresholds `thr` [n] and the step's `sync` flag (0-d bool)."""
        head_in = self.head_input(x)
        conf = self.scorer(head_in) if self.scorer is not None else torch.zeros_like(thr)
        leave = conf >= thr
        everyone = (leave | thr.isnan()).all()
        return head_in, torch.where(sync, leave & everyone, leave)


def scorer_for(cfg, ramp, can_score: bool, vocab: VocabScorer | None) -> tuple[nn.Module | None, str]:
    """An exit's scorer under `cfg.confidence` (module docstring), and its
    tag; `vocab`: the model's vocabulary scorer, shared by its exits."""
    if not can_score:
        return None, "forced"
    if cfg.confidence == "gate":
        return GateScorer(ramp), "gate"
    return vocab, cfg.confidence.replace("@", "")


def head_tag(measure_tag: str, ramp, column: int, columns: int) -> str:
    """What a deciding stage's graph bakes in besides its layers: the
    measure, the ramp kind (`r64g`: rank 64 with a gate) and which of how
    many threshold columns it reads."""
    return f"{measure_tag}_r{ramp.rank}{'g' if ramp.has_gate else ''}_c{column}of{columns}"
