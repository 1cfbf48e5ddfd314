"""E3 subclasses of vLLM's Llama-family causal LMs.

`E3CausalLMMixin` adds ramps at the configured exit points and, when exits
can fire, runs the decoder layers as compiled stages that end in their exit's
decision (vllm_e3/models/stage.py, heads.py) under the stage loop
(vllm_e3/models/loop.py): rows leave at exits, the rest run on, and under
policy e3 small groups park. The model holds weights and what they compute
(stages, exit heads, the K/V rows for the fill); request state is the
runner's (vllm_e3.runtime), reached through the step context
(vllm_e3.models.step).

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

from ..calibration import Calibration
from ..config import CALIBRATION_FILENAME, RAMPS_FILENAME, e3_config_from_vllm, e3_dir
from ..profile import timed
from ..ramps import Ramp, load_ramp_tensors, require_gates, validate_ramps
from .attention import AttentionView
from .heads import ExitHead, VocabScorer, head_tag, scorer_for
from .kv_fill import StackedKVFill, capture_kv_weights
from .loop import StageLoop
from .parallel import PipelineRank, tp_group
from .stage import DECIDE, FINAL, PASS, build_stage
from .step import current_step

logger = logging.getLogger("vllm.e3")


class E3CausalLMMixin:
    """Ramps + early exits over a vLLM `*ForCausalLM` with `.model.layers`,
    `.model.norm`, `.lm_head`. Put it first in the bases."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        e3 = e3_config_from_vllm(vllm_config)
        e3.validate_for_model(vllm_config.model_config.hf_config.num_hidden_layers)
        if e3.plan and vllm_config.parallel_config.pipeline_parallel_size > 1:
            # the partition must be set before vLLM builds this rank's layers (vllm_e3.pipeline)
            from ..pipeline import startup_pp_plan

            e3 = startup_pp_plan(e3, vllm_config.model_config.model, vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        cfg = self.config
        self.e3 = e3
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
        # pipeline parallel: this rank's layers [lo, hi) and the part of each
        # stage inside them (vllm_e3.models.parallel); one rank: [0, L)
        self.e3_rank = PipelineRank.of(self.model, self.e3)
        # A pipeline rank before the last decides exits without vLLM's final
        # norm and LM head (PPMissingLayer there): it loads its own copies
        # from the checkpoint (load_weights), the norm as vLLM's RMSNorm so
        # the head input is the last rank's bit for bit.
        self.e3_norm = None
        if self.e3.exits_active and not self.e3_rank.last and self.e3_rank.decides:
            from vllm.model_executor.layers.layernorm import RMSNorm

            self.e3_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        # the exit heads this rank decides with, and the stages as compile
        # units (vllm_e3/models/stage.py), keyed by start layer; plain dict
        # attributes, not submodules: the layers, ramps and head stay
        # registered (and loaded) once, under the model
        self.e3_heads: dict[int, ExitHead] = self._e3_build_heads(vllm_config) if self.e3.exits_active else {}
        self.e3_stages: dict[int, nn.Module] = {}
        if self.e3.exits_active:
            self.e3_stages = self._e3_build_stages(vllm_config, prefix)
            if not self.e3_rank.single:      # exited rows travel with the hidden states
                self.make_empty_intermediate_tensors = self.e3_rank.empty_tensors_factory(
                    self.make_empty_intermediate_tensors)
        self.e3_kv_weights: list = []
        self.e3_kv_stack: StackedKVFill | None = None
        logger.info("vllm-e3: %s policy=%s exits=%s thresholds=%s confidence=%s ramps=%s",
                    type(self).__name__, self.e3.policy, list(self.e3.exits),
                    list(self.e3.thresholds), self.e3.confidence, self.e3_ramps_path or "identity")

    def _e3_build_heads(self, vllm_config) -> dict[int, ExitHead]:
        """One exit head per exit this rank decides (vllm_e3/models/heads.py),
        sharing one vocabulary scorer. An engine with no threshold and no
        calibration table never scores a row: its heads skip the confidence."""
        cfg, rank = self.e3, self.e3_rank
        can_score = self.e3_table is not None or any(t is not None for t in cfg.thresholds)
        norm = self.e3_norm if self.e3_norm is not None else self.model.norm
        vocab = None
        heads = {}
        for j, e in enumerate(cfg.exits):
            if e not in rank.decides:
                continue
            ramp = self.e3_ramps[str(e)]
            if cfg.confidence != "gate" and can_score and vocab is None:
                vocab = self._e3_vocab_scorer(vllm_config.model_config.dtype)
            scorer, tag = scorer_for(cfg, ramp, can_score, vocab)
            heads[e] = ExitHead(e, j, ramp, norm, scorer, head_tag(tag, ramp, j, len(cfg.exits)))
        return heads

    def _e3_vocab_scorer(self, dtype):
        """The head rows this rank's exit confidence reads: the LM head itself
        (read at call time), or a copy filled in load_weights -- the
        shortlist's rows of this tensor-parallel shard, or on a pipeline rank
        without the head, the checkpoint's rows (`_e3_load_head_copies`)."""
        cfg, d = self.e3, self.config.hidden_size
        measure = "max_prob" if self.e3_shortlist is not None else cfg.confidence
        if not self.e3_rank.last:
            ids = self.e3_shortlist
            n = int(ids.numel()) if ids is not None else self.config.vocab_size
            return VocabScorer(measure, rows=n, d=d, ids=ids, dtype=dtype)
        if self.e3_shortlist is None:
            return VocabScorer(measure, lm_head=self.lm_head, group=tp_group())
        idx = self.lm_head.shard_indices
        start, n_real = idx.org_vocab_start_index, idx.num_org_elements
        ids = self.e3_shortlist
        mine = ids[(ids >= start) & (ids < start + n_real)]
        return VocabScorer(measure, rows=int(mine.numel()), d=d, ids=mine, group=tp_group(), dtype=dtype)

    def _e3_build_stages(self, vllm_config, prefix: str) -> dict[int, nn.Module]:
        """This rank's part of each stage, ending in its exit's decision, the
        final norm (the model's last layer), or nothing (a rank boundary)."""
        rank, L = self.e3_rank, self.e3_num_layers
        stages = {}
        for a, b in rank.ranges:
            if b in self.e3_heads:
                kind, head, norm = DECIDE, self.e3_heads[b], None
            elif b == L and rank.last:
                kind, head, norm = FINAL, None, self.model.norm
            else:
                kind, head, norm = PASS, None, None
            stages[a] = build_stage(vllm_config, self.model.layers, a, b, kind, head, norm, prefix)
        return stages

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
        if self.e3.exits_active:
            self._e3_capture_kv_weights()
            vocab = self._e3_shared_vocab()
            if vocab is not None and vocab.lm_head is None and self.e3_rank.last:
                # the shortlist's rows, before vLLM's CPU path may repack the head
                start = self.lm_head.shard_indices.org_vocab_start_index
                vocab.rows.data.copy_(self.lm_head.weight[(vocab.ids - start).to(vocab.rows.device)])
        return loaded

    def _e3_shared_vocab(self) -> VocabScorer | None:
        return next((h.scorer for h in self.e3_heads.values() if isinstance(h.scorer, VocabScorer)), None)

    def _e3_head_names(self) -> tuple[str, str | None]:
        """Checkpoint names of the final norm and of the head rows (the input
        embedding when tied; None: the gate reads no head)."""
        head = None
        if self._e3_shared_vocab() is not None:
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
            vocab = self._e3_shared_vocab()
            head = side[head_name][:self.config.vocab_size]
            rows = head[vocab.ids] if vocab.ids is not None else head
            vocab.rows.data.copy_(rows.to(vocab.rows.dtype))

    def _e3_capture_kv_weights(self) -> None:
        """Each layer's K/V rows of `qkv_proj` for the KV fill
        (vllm_e3.models.kv_fill), and every skipped layer filled at once
        where the layers allow it; the per-layer weights become views of it."""
        rank = self.e3_rank
        self.e3_kv_weights = capture_kv_weights(self.model.layers, rank.owns)
        first = rank.first_fill
        self.e3_kv_stack = (StackedKVFill.build(self.model.layers, self.e3_kv_weights, first, rank.hi)
                            if first is not None else None)
        if self.e3_kv_stack is not None:
            st = self.e3_kv_stack
            for l in range(st.first, st.hi):
                self.e3_kv_weights[l] = st.weights_of(l)

    # ---- forward -------------------------------------------------------
    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if not self.e3.exits_active:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        step = current_step()
        if step is None or not step.bound:
            # profile / dummy runs, or no E3 runner: nothing can exit
            return self._e3_run_layers(input_ids, positions, intermediate_tensors, inputs_embeds)
        fc = get_forward_context()
        return StageLoop(self, step, fc, AttentionView(fc, step.attn), input_ids, positions, inputs_embeds,
                         intermediate_tensors).run()

    def _e3_run_layers(self, input_ids, positions, intermediate_tensors, inputs_embeds):
        """Every stage on all rows, none leaving (thresholds NaN): the warm-up
        / profile run is each stage's first call, which compiles it at >= 2
        rows with a dynamic count."""
        model, rank = self.model, self.e3_rank
        if intermediate_tensors is None:
            h = model.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
            residual = None
        else:
            h, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        n = h.shape[0]
        rows = torch.arange(n)
        thr = torch.full((n, len(self.e3.exits)), float("nan"))
        sync = torch.tensor(False)
        for stage in self.e3_stages.values():
            res = stage(positions, h, residual, rows, thr, sync)
            if stage.kind == FINAL:
                return res
            if stage.kind == PASS:
                h, residual = res
            else:
                positions, h, residual, rows, thr = res[:5]
        return rank.send(h, residual, torch.zeros_like(h), torch.zeros(n, dtype=torch.long))

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
