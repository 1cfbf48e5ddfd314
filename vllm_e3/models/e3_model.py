"""E3 subclasses of vLLM's Llama-family causal LMs.

`E3CausalLMMixin` adds ramps at the configured exit points and, when exits
can fire, runs the decoder layers as compiled stages (vllm_e3/models/stage.py)
under the stage loop (vllm_e3/models/loop.py): rows leave at exits, the rest
are compacted, and under policy e3 small groups park. The model holds
weights and what they compute (stages, ramps, exit decisions, the K/V rows
for the fill); request state is the runner's (vllm_e3.runtime), reached
through the step context (vllm_e3.step).

The model returns, per row, the state the LM head reads; `compute_logits` and
vLLM's sampler are untouched. With policy `full` (or no exit that can fire)
`forward` is the parent's, compiled as vLLM compiles it, so output and speed
are vanilla vLLM's.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
from torch import nn

from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from ..attention import AttentionView
from ..config import CALIBRATION_FILENAME, RAMPS_FILENAME, e3_config_from_vllm, e3_dir
from ..exits import ExitPlan, StackedKVFill, forced_exit_mask
from ..calibration import Calibration
from ..kernels import gate_confidence
from ..parallel import PipelineRank, VocabShard, tp_group
from ..profile import timed
from ..step import current_step
from ..ramps import Ramp, load_ramp_tensors, require_gates, validate_ramps
from .loop import StageLoop
from .stage import build_stages

logger = logging.getLogger("vllm.e3")


class E3CausalLMMixin:
    """Ramps + early exits over a vLLM `*ForCausalLM` with `.model.layers`,
    `.model.norm`, `.lm_head`. Put it first in the bases."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        cfg = self.config
        self.e3 = e3_config_from_vllm(vllm_config)
        self.e3.validate_for_model(cfg.num_hidden_layers)
        if self.e3.plan:   # measure here, keep what pays (vllm_e3.planner)
            from ..planner import startup_plan

            self.e3 = startup_plan(self.e3, vllm_config.model_config.model, vllm_config)
        self.e3_num_layers = cfg.num_hidden_layers
        ramps_path = os.path.join(e3_dir(vllm_config.model_config.model), RAMPS_FILENAME)
        self.e3_ramps_path = ramps_path if os.path.isfile(ramps_path) else None
        specs = (validate_ramps(ramps_path, self.e3.exits, cfg.hidden_size)
                 if self.e3_ramps_path else {})
        eps = cfg.rms_norm_eps
        self.e3_ramps = nn.ModuleDict({
            str(e): Ramp(cfg.hidden_size, specs[e].rank if e in specs else 0,
                         specs[e].has_gate if e in specs else False, eps)
            for e in self.e3.exits
        })
        require_gates(self.e3, specs, ramps_path)
        self.e3_table = Calibration.load(os.path.join(e3_dir(vllm_config.model_config.model),
                                                           CALIBRATION_FILENAME))
        # confidence shortlist@K: the head rows the exit decision reads (checked at start-up)
        ids = self.e3_table.shortlist_ids(self.e3.confidence) if self.e3_table is not None else None
        self.e3_shortlist = torch.tensor(ids, dtype=torch.long) if ids is not None else None
        # the head rows the exit confidence reads on this rank (vllm_e3.parallel):
        # the shortlist's, gathered in load_weights, or the whole head, taken
        # at the first decision (after vLLM's post-load processing)
        self.e3_vocab: VocabShard | None = None
        # the stages [start, end) as compile units (vllm_e3/models/stage.py),
        # keyed by start layer; a plain dict attribute, not submodules: the
        # layers stay registered (and loaded) once, under model.layers
        self.e3_stages: dict[int, nn.Module] = {}
        # pipeline parallel: this rank's layers [lo, hi) and the part of each
        # stage inside them (vllm_e3.parallel); one rank: [0, L)
        self.e3_rank = PipelineRank.of(self.model, self.e3)
        if self.e3.exits_active:
            ranges = self.e3_rank.ranges
            self.e3_stages = dict(zip((a for a, _ in ranges),
                                      build_stages(vllm_config, self.model.layers, ranges, prefix)))
            if not self.e3_rank.single:      # exited rows travel with the hidden states
                self.make_empty_intermediate_tensors = self.e3_rank.empty_tensors_factory(
                    self.make_empty_intermediate_tensors)
        # A pipeline rank before the last decides exits without vLLM's final
        # norm and LM head (PPMissingLayer there): it loads its own copies
        # from the checkpoint (load_weights), the norm as vLLM's RMSNorm so
        # the head input is the last rank's bit for bit.
        self.e3_norm = None
        if self.e3.exits_active and not self.e3_rank.last and self.e3_rank.decides:
            from vllm.model_executor.layers.layernorm import RMSNorm

            self.e3_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        logger.info("vllm-e3: %s policy=%s exits=%s thresholds=%s confidence=%s ramps=%s",
                    type(self).__name__, self.e3.policy, list(self.e3.exits),
                    list(self.e3.thresholds), self.e3.confidence, self.e3_ramps_path or "identity")

    # ---- weights -------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        side: dict[str, torch.Tensor] = {}
        if self.e3_norm is not None:         # a pipeline rank without the head: keep copies
            weights = _tee(weights, self._e3_head_names(), side)
        loaded = set(super().load_weights(weights))
        if self.e3_norm is not None:
            self._e3_load_head_copies(side)
            loaded.update(name for name, _ in self.e3_norm.named_parameters(prefix="e3_norm"))
        if self.e3_ramps_path:
            tensors = load_ramp_tensors(self.e3_ramps_path, self.e3.exits)
            for e, ramp in self.e3_ramps.items():
                for key, param in ramp.param_items(int(e)):
                    param.data.copy_(tensors[key].to(param.dtype))
        loaded.update(name for name, _ in self.e3_ramps.named_parameters(prefix="e3_ramps"))
        self._e3_capture_kv_weights()
        if self.e3_shortlist is not None and self.e3_vocab is None:   # before vLLM's CPU path may repack the head
            self.e3_vocab = VocabShard.of(self.lm_head, self.e3_shortlist, tp_group())
        return loaded

    def _e3_head_names(self) -> tuple[str, str | None]:
        """Checkpoint names of the final norm and of the head rows (the input
        embedding when tied; None: the gate reads no head)."""
        head = None
        if self.e3.confidence != "gate":
            head = ("model.embed_tokens.weight" if getattr(self.config, "tie_word_embeddings", False)
                    else "lm_head.weight")
        return "model.norm.weight", head

    def _e3_load_head_copies(self, side: dict[str, torch.Tensor]) -> None:
        norm_name, head_name = self._e3_head_names()
        for name in (norm_name, head_name):
            if name is not None and name not in side:
                raise ValueError(f"vllm-e3: pipeline rank deciding exits {sorted(self.e3_rank.decides)} "
                                 f"needs {name!r} from the checkpoint, which has none")
        self.e3_norm.weight.data.copy_(side[norm_name])
        if head_name is not None:
            dtype = self.e3_norm.weight.dtype
            head = side[head_name][:self.config.vocab_size]
            if self.e3_shortlist is not None:
                self.e3_vocab = VocabShard(head[self.e3_shortlist].to(dtype), self.e3_shortlist, 0)
            else:
                self.e3_vocab = VocabShard(head.to(dtype), None, 0)

    def _e3_capture_kv_weights(self) -> None:
        """Keep each layer's K/V rows of `qkv_proj` for the KV fill, which
        needs K and V only (Q is ~60% of the projection on GQA models). Taken
        now, before vLLM's CPU path may repack the weight for oneDNN; skipped
        (full qkv_proj used) for quantized projections."""
        self.e3_kv_weights = []
        for l, layer in enumerate(self.model.layers):
            if not self.e3_rank.owns(l):     # another pipeline rank's layer
                self.e3_kv_weights.append(None)
                continue
            attn = layer.self_attn
            proj = attn.qkv_proj
            w = getattr(proj, "weight", None)
            if type(proj.quant_method).__name__ != "UnquantizedLinearMethod" or w is None or w.ndim != 2:
                self.e3_kv_weights.append(None)
                continue
            b = getattr(proj, "bias", None)
            self.e3_kv_weights.append((w[attn.q_size:].detach().clone(),
                                       None if b is None else b[attn.q_size:].detach().clone()))
        # every skipped layer filled at once where the layers allow it
        # (vllm_e3.exits.StackedKVFill); the per-layer weights become views of it
        first = self.e3_rank.first_fill if self.e3.exits_active else None
        self.e3_kv_stack = (StackedKVFill.build(self.model.layers, self.e3_kv_weights, first,
                                                self.e3_rank.hi)
                            if first is not None else None)
        if self.e3_kv_stack is not None:
            st = self.e3_kv_stack
            for j in range(st.w.shape[0]):
                b = None if st.b is None else st.b[j, 0]
                self.e3_kv_weights[st.first + j] = (st.w[j], b)

    # ---- forward -------------------------------------------------------
    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if not self.e3.exits_active:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        step = current_step()
        if step is None or not step.bound:
            # profile / dummy runs, or no E3 runner: nothing can exit
            return self._e3_run_layers(input_ids, positions, intermediate_tensors, inputs_embeds)
        fc = get_forward_context()
        loop = StageLoop(self, step, fc, AttentionView(fc, step.attn))
        return loop.run(input_ids, positions, inputs_embeds, intermediate_tensors)

    def _e3_run_layers(self, input_ids, positions, intermediate_tensors, inputs_embeds):
        model, rank = self.model, self.e3_rank
        if intermediate_tensors is None:
            h = model.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
            residual = None
        else:
            h, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        # every stage on all rows: the warm-up/profile run is each stage's
        # first call, which compiles it at >= 2 rows with a dynamic count
        for stage in self.e3_stages.values():
            h, residual = stage(positions, h, residual)
        if not rank.last:
            return rank.send(h, residual, torch.zeros_like(h), torch.zeros(h.shape[0], dtype=torch.long))
        return model.norm(h, residual)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The LM head for the requests that yield a token this step. A parked
        request's sample is discarded (vllm_e3.worker), so its row of logits is
        left at zero instead of paying the 576 x 49152 head (~8 layers of this
        model) for nothing."""
        step = current_step()
        skip = step.no_logits if step is not None else None
        prof = step.runtime.profile if step is not None and step.runtime is not None else None
        if skip is None or hidden_states.shape[0] != skip.numel():
            with timed(prof, "head", hidden_states.shape[0]):
                return super().compute_logits(hidden_states)
        keep = (~skip).nonzero().squeeze(1)
        with timed(prof, "head", int(keep.numel())):
            part = super().compute_logits(hidden_states[keep])
        if part is None:
            return None
        logits = part.new_zeros(hidden_states.shape[0], part.shape[1])
        logits[keep] = part
        return logits

    def e3_head_input(self, e: int, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """[n, d] state the LM head reads for rows exiting at `e`."""
        norm = self.e3_norm if self.e3_norm is not None else self.model.norm
        return norm(self.e3_ramps[str(e)](h + residual))

    def e3_leave(self, e: int, plan: ExitPlan, cand_rows: torch.Tensor, head_in: torch.Tensor,
                 pos: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """[m] bool: which candidate rows (forward rows `cand_rows`) leave at `e`."""
        rate = plan.rate[e][cand_rows]
        forced = ~torch.isnan(rate)
        leave = torch.zeros(cand_rows.numel(), dtype=torch.bool)
        if bool(forced.any()):
            leave[forced] = forced_exit_mask(self.e3.seed, e, rate[forced], pos[forced], tok[forced])
        thr = plan.threshold[e][cand_rows]
        scored = ~forced & torch.isfinite(thr)
        if bool(scored.any()):
            idx = scored.nonzero().squeeze(1)
            x = head_in[idx]
            if self.e3.confidence == "gate":
                ramp = self.e3_ramps[str(e)]
                res = gate_confidence(x, ramp.gate_weight[0], ramp.gate_bias, thr[idx])
            else:        # the head over this rank's vocabulary, merged across ranks
                if self.e3_vocab is None:
                    self.e3_vocab = VocabShard.of(self.lm_head, None, tp_group())
                measure = "max_prob" if self.e3_shortlist is not None else self.e3.confidence
                res = self.e3_vocab.confidence(x, thr[idx], measure)
            leave[idx] = res.exit_mask.cpu()
        return leave


class E3LlamaForCausalLM(E3CausalLMMixin, LlamaForCausalLM):
    pass


class E3MistralForCausalLM(E3CausalLMMixin, MistralForCausalLM):
    pass


class E3Qwen2ForCausalLM(E3CausalLMMixin, Qwen2ForCausalLM):
    pass


class E3Qwen3ForCausalLM(E3CausalLMMixin, Qwen3ForCausalLM):
    pass


def _tee(weights, names, into: dict):
    """`weights` as they are, keeping a copy of the tensors named `names`."""
    for name, w in weights:
        if name in names:
            into[name] = w.detach().clone()
        yield name, w
