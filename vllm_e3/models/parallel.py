"""E3 under vLLM's tensor parallelism: the exit decision over a sharded LM head.

With `--tensor-parallel-size T`, vLLM's `ParallelLMHead` holds on rank r the
rows of vocabulary ids [start_r, end_r) (padded to a multiple of 64, the pad
rows zero). The confidence of an exit (max_prob or margin over the whole
vocabulary, or over a shortlist) needs every rank's rows. Each rank computes
the partial statistics of its own rows (`kernels.ConfidencePartials`: top
logit, second, sum of exp, top-1 id: 16 bytes a row) and one all-gather over
the tensor-parallel group gives every rank all T partials, which merge as the
fused kernel merges its vocabulary splits (ranks ascend in vocabulary, so a
tie goes to the lowest id; over a shortlist, to the lowest rank, then the
earliest position in the shortlist). Every rank then holds the same bits and makes the
same decision for every row: no rank keeps a row another drops, and no
collective inside a later stage waits for a rank that took another path.

The alternative, deciding on one rank and broadcasting the mask, needs the
same partials gathered to that rank plus a broadcast: two collectives instead
of one (measured in benchmarks/bench_tp_confidence.py).

Everything else an exit reads is replicated and computed identically on every
rank: the hidden state (after vLLM's all-reduce), the ramps and gates (plain
modules, loaded whole on each rank), the synthetic profile's hash. The KV fill
projects with each rank's own rows of `qkv_proj`, so it writes that rank's
K/V heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import ConfidencePartials, ExitConfidence, exit_confidence, merge_partials


@dataclass
class VocabShard:
    """The LM-head rows the exit confidence reads on this rank."""
    weight: torch.Tensor                 # [k, d]: real rows only (no padding)
    ids: torch.Tensor | None             # [k] their vocabulary ids; None: offset + arange(k)
    offset: int                          # first vocabulary id of this rank's shard
    group: object = None                 # vLLM's tensor-parallel GroupCoordinator; None: T = 1

    @classmethod
    def of(cls, lm_head, shortlist: torch.Tensor | None = None, group=None) -> "VocabShard":
        """This rank's rows of `lm_head` (a vLLM ParallelLMHead), or of the
        shortlist ids among them. `group`: the TP group when its size > 1.
        The whole head is a view (padding rows left out); shortlist rows are
        a copy, gathered once."""
        idx = lm_head.shard_indices
        start, n_real = idx.org_vocab_start_index, idx.num_org_elements
        w = lm_head.weight
        if shortlist is None:
            return cls(w[:n_real], None, start, group)
        ids = shortlist.to(torch.long)
        mine = (ids >= start) & (ids < start + n_real)
        ids = ids[mine]
        return cls(w[(ids - start).to(w.device)].detach().clone(), ids, start, group)

    def confidence(self, hidden: torch.Tensor, threshold: torch.Tensor, measure: str) -> ExitConfidence:
        """Confidence of `hidden` [n, d] (final-normed) over the whole head
        (or shortlist), the same on every rank; argmax as a vocabulary id."""
        if self.group is None:              # one rank: the fused kernel over these rows
            res = exit_confidence(hidden, self.weight, threshold, measure)
            res.argmax = self.ids[res.argmax] if self.ids is not None else res.argmax + self.offset
            return res
        part = ConfidencePartials.of_logits(hidden.to(self.weight.dtype) @ self.weight.T)
        part.a = self.ids[part.a] if self.ids is not None and self.ids.numel() else part.a + self.offset
        n = hidden.shape[0]
        packed = self.group.all_gather(part.pack()[None], dim=0)    # [T, 4, n], rank order
        return merge_partials(ConfidencePartials.unpack(packed.view(-1, 4, n)), threshold, measure)

    def score(self, hidden: torch.Tensor, measure: str) -> torch.Tensor:
        """[n] fp32 confidence of `hidden` [n, d], the same on every rank
        (what a compiled stage compares with its per-row thresholds)."""
        never = torch.full((hidden.shape[0],), float("inf"), device=hidden.device)
        return self.confidence(hidden, never, measure).confidence


def tp_group():
    """vLLM's tensor-parallel group when its size > 1, else None."""
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

    return get_tp_group() if get_tensor_model_parallel_world_size() > 1 else None


# ---- pipeline parallel -------------------------------------------------------------------
# The tensors an E3 rank sends the next one besides vLLM's own two: for every
# row its exit layer (`e3_exit`, 0: still running) and, for a row that exited,
# the state the LM head reads (`e3_out`); such a row's `hidden_states` is its
# pre-ramp state and its `residual` 0, so the next rank's KV fill of the
# layers it skipped reads hidden_states + residual as the exiting rank would.


@dataclass
class PipelineRank:
    """This pipeline rank's share of an E3 model. Rank r holds layers
    [lo, hi) (vLLM's `get_pp_indices`; the others are PPMissingLayer). It
    runs the part of every stage inside them, decides the exits e with
    lo < e <= hi (the state after layer e-1 is its own), and fills the K/V of
    its own layers for every row that exited at or before them, on whatever
    rank. One rank: lo = 0, hi = L."""
    lo: int
    hi: int
    num_layers: int
    first: bool
    last: bool
    ranges: list[tuple[int, int]]        # this rank's parts of the stages, in order
    decides: frozenset[int]              # exit points decided here
    first_fill: int | None               # lowest layer this rank may fill, None: none

    @classmethod
    def of(cls, backbone, cfg) -> "PipelineRank":
        from vllm.distributed import get_pp_group

        pp = get_pp_group()
        L = len(backbone.layers)
        lo, hi = getattr(backbone, "start_layer", 0), getattr(backbone, "end_layer", L)
        ranges = [(max(a, lo), min(b, hi)) for a, b in cfg.stages(L) if max(a, lo) < min(b, hi)]
        exits = [e for e in cfg.exits if e < L]
        decides = frozenset(e for e in exits if lo < e <= hi)
        early = [e for e in exits if e < hi]
        return cls(lo, hi, L, pp.is_first_rank, pp.is_last_rank, ranges, decides,
                   max(min(early), lo) if early else None)

    @property
    def single(self) -> bool:
        return self.first and self.last

    def owns(self, layer: int) -> bool:
        return self.lo <= layer < self.hi

    def empty_tensors_factory(self, base):
        """vLLM's `make_empty_intermediate_tensors` with the E3 keys added:
        the receiving rank copies what arrives into these buffers
        (gpu_model_runner.sync_and_gather_intermediate_tensors), key by key."""
        def make(batch_size: int, dtype: torch.dtype, device: torch.device):
            t = base(batch_size=batch_size, dtype=dtype, device=device)
            h = t["hidden_states"]
            t.tensors["e3_out"] = torch.zeros_like(h)
            t.tensors["e3_exit"] = torch.zeros(batch_size, dtype=torch.long, device=device)
            return t
        return make

    def send(self, hidden: torch.Tensor, residual: torch.Tensor, out: torch.Tensor,
             exit_of: torch.Tensor):
        from vllm.sequence import IntermediateTensors

        return IntermediateTensors({"hidden_states": hidden, "residual": residual,
                                    "e3_out": out, "e3_exit": exit_of})
