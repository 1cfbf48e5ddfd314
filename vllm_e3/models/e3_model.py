"""E3 subclasses of vLLM's Llama-family causal LMs.

`E3CausalLMMixin` adds ramps at the configured exit points and, when exits
can fire, replaces the backbone's forward by a stage loop:

    for each stage [a, b):   run layers a..b-1 on the active rows
        at exit b:           decide which decode rows exit (confidence or the
                             synthetic profile); exited rows write their ramp
                             output; the rest are compacted and the attention
                             metadata sliced to them
    finally:                 final norm for the rows that ran to the end,
                             KV fill for every layer an exited row skipped

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

from collections import OrderedDict, defaultdict

from ..config import CALIBRATION_FILENAME, RAMPS_FILENAME, e3_config_from_vllm, e3_dir
from ..exits import (Active, AttentionView, ExitPlan, ExitStats, Parked, RequestExitStats, RowLayout,
                     forced_exit_mask, kv_fill_layer)
from ..knobs import CalibrationTable
from ..kernels import compact, exit_confidence, gate_confidence
from ..step import current_step
from ..ramps import Ramp, load_ramp_tensors, require_gates, validate_ramps
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
        self.e3_table = CalibrationTable.load(os.path.join(e3_dir(vllm_config.model_config.model),
                                                           CALIBRATION_FILENAME))
        self.e3_stats = ExitStats()
        self.e3_parked: dict[str, Parked] = {}   # request id -> its parked token
        # per request id: running requests, and the last FINISHED_KEPT finished
        self.e3_requests: defaultdict[str, RequestExitStats] = defaultdict(RequestExitStats)
        self.e3_finished: OrderedDict[str, RequestExitStats] = OrderedDict()
        # [num_reqs] bool, set by a forward that parked rows and read by the
        # next compute_logits: parked requests get no token, so no head row
        self._e3_no_logits: torch.Tensor | None = None
        # the stages [start, end) as compile units (vllm_e3/models/stage.py),
        # keyed by start layer; a plain dict attribute, not submodules: the
        # layers stay registered (and loaded) once, under model.layers
        self.e3_stages: dict[int, nn.Module] = {}
        if self.e3.exits_active:
            ranges = self.e3.stages(self.e3_num_layers)
            self.e3_stages = dict(zip((a for a, _ in ranges),
                                      build_stages(vllm_config, self.model.layers, ranges, prefix)))
        logger.info("vllm-e3: %s policy=%s exits=%s thresholds=%s confidence=%s ramps=%s",
                    type(self).__name__, self.e3.policy, list(self.e3.exits),
                    list(self.e3.thresholds), self.e3.confidence, self.e3_ramps_path or "identity")

    # ---- weights -------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = set(super().load_weights(weights))
        if self.e3_ramps_path:
            tensors = load_ramp_tensors(self.e3_ramps_path, self.e3.exits)
            for e, ramp in self.e3_ramps.items():
                for key, param in ramp.param_items(int(e)):
                    param.data.copy_(tensors[key].to(param.dtype))
        loaded.update(name for name, _ in self.e3_ramps.named_parameters(prefix="e3_ramps"))
        self._e3_capture_kv_weights()
        return loaded

    def _e3_capture_kv_weights(self) -> None:
        """Keep each layer's K/V rows of `qkv_proj` for the KV fill, which
        needs K and V only (Q is ~60% of the projection on GQA models). Taken
        now, before vLLM's CPU path may repack the weight for oneDNN; skipped
        (full qkv_proj used) for quantized projections."""
        self.e3_kv_weights = []
        for layer in self.model.layers:
            attn = layer.self_attn
            proj = attn.qkv_proj
            w = getattr(proj, "weight", None)
            if type(proj.quant_method).__name__ != "UnquantizedLinearMethod" or w is None or w.ndim != 2:
                self.e3_kv_weights.append(None)
                continue
            b = getattr(proj, "bias", None)
            self.e3_kv_weights.append((w[attn.q_size:].detach().clone(),
                                       None if b is None else b[attn.q_size:].detach().clone()))

    # ---- forward -------------------------------------------------------
    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        self._e3_no_logits = None
        if not self.e3.exits_active:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        fc = get_forward_context()
        if not isinstance(fc.attn_metadata, dict) or not fc.attn_metadata:
            # profile / dummy runs carry no metadata: nothing can exit
            return self._e3_run_layers(input_ids, positions, inputs_embeds)
        return self._e3_forward(fc, input_ids, positions, inputs_embeds)

    def _e3_run_layers(self, input_ids, positions, inputs_embeds):
        model = self.model
        h = model.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        # every stage on all rows: the warm-up/profile run is each stage's
        # first call, which compiles it at >= 2 rows with a dynamic count
        for stage in self.e3_stages.values():
            h, residual = stage(positions, h, residual)
        return model.norm(h, residual)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The LM head for the requests that yield a token this step. A parked
        request's sample is discarded (vllm_e3.worker), so its row of logits is
        left at zero instead of paying the 576 x 49152 head (~8 layers of this
        model) for nothing."""
        skip, self._e3_no_logits = self._e3_no_logits, None
        if skip is None or hidden_states.shape[0] != skip.numel():
            return super().compute_logits(hidden_states)
        keep = (~skip).nonzero().squeeze(1)
        part = super().compute_logits(hidden_states[keep])
        if part is None:
            return None
        logits = part.new_zeros(hidden_states.shape[0], part.shape[1])
        logits[keep] = part
        return logits

    def e3_head_input(self, e: int, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """[n, d] state the LM head reads for rows exiting at `e`."""
        return self.model.norm(self.e3_ramps[str(e)](h + residual))

    def _e3_decide(self, e: int, plan: ExitPlan, cand_rows: torch.Tensor, head_in: torch.Tensor,
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
            else:
                res = exit_confidence(x, self.lm_head.weight, thr[idx], measure=self.e3.confidence)
            leave[idx] = res.exit_mask.cpu()
        return leave

    def _e3_forward(self, fc, input_ids, positions, inputs_embeds):
        model, stats, cfg = self.model, self.e3_stats, self.e3
        h = model.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        out = torch.zeros_like(h)                         # [N, d] head input per row
        step = current_step()
        layout = RowLayout.from_metadata(next(iter(fc.attn_metadata.values())), positions,
                                         step.prompt_lens if step is not None else None)
        plan = ExitPlan.build(cfg, layout, h.shape[0], step)
        attn_layers = {layer.self_attn.attn.layer_name: layer.self_attn.attn for layer in model.layers}
        view = AttentionView(fc, attn_layers)
        act = Active(torch.arange(h.shape[0]), h, None, positions, input_ids,
                     torch.zeros(h.shape[0], dtype=torch.long))
        resume = self._e3_take_resumed(layout, act, step)   # stage start -> Active
        if resume:
            resumed_rows = torch.cat([r.rows for r in resume.values()])
            keep = torch.ones(act.rows.numel(), dtype=torch.bool)
            keep[resumed_rows] = False
            act = act.take(keep.nonzero().squeeze(1))
        # (exit, forward rows [m], pre-ramp state [m, d], positions [m])
        exited: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # a resumed token was counted in the step that parked it
        n_decode = int(layout.decode_row.sum()) - sum(int(r.rows.numel()) for r in resume.values())
        stats.steps += 1
        num_reqs = layout.query_start_loc.numel() - 1
        stats.step_reqs += num_reqs
        stats.step_reqs_max = max(stats.step_reqs_max, num_reqs)
        stats.decode_tokens += n_decode
        stats.layers_full += n_decode * self.e3_num_layers
        restricted = bool(resume)
        parked_rows: list[torch.Tensor] = []
        try:
            for start, end in cfg.stages(self.e3_num_layers):
                if start in resume:                        # parked tokens rejoin here
                    act = act.merge(resume.pop(start)) if act.rows.numel() else resume.pop(start)
                    restricted = True
                if act.rows.numel() == 0:
                    continue
                if restricted:
                    view.restrict(act.rows, torch.unique_consecutive(layout.req_of_row[act.rows]))
                    restricted = False
                # compiled stage on the m >= 1 active rows: [m] positions, [m, d] states
                act.h, act.residual = self.e3_stages[start](act.positions, act.h, act.residual)
                n_dec = int(plan.decode[act.rows].sum())
                stats.layers_run += n_dec * (end - start)
                if n_dec:  # batch sizes a stage ran at, counted in decode tokens
                    stats.stage_rows[start] = stats.stage_rows.get(start, 0) + n_dec
                    stats.stage_runs[start] = stats.stage_runs.get(start, 0) + 1
                if end == self.e3_num_layers:
                    break
                act, gone = self._e3_exit(end, plan, layout, act, out, exited)
                restricted |= gone
                if act.rows.numel() and self._e3_should_park(end, plan, act, resume):
                    parked_rows.append(self._e3_park(end, act, resume, layout, step))
                    act = act.take(act.rows[:0])
            if act.rows.numel():
                out[act.rows] = model.norm(act.h, act.residual)[0]
                self._e3_record_waits(act.waited)
        finally:
            view.restore()
        stats.mixed_exit_steps += len(exited) > 1
        # forward rows parked this step (padding rows dropped)
        parked = torch.cat(parked_rows) if parked_rows else torch.zeros(0, dtype=torch.long)
        parked = parked[parked < layout.num_rows]
        if parked.numel():
            skip = torch.zeros(num_reqs, dtype=torch.bool)
            skip[layout.req_of_row[parked]] = True
            self._e3_no_logits = skip
        if step is not None:
            self._e3_account(layout, step, exited, parked)
        exited = [(e, r[plan.kv_fill[r]], x[plan.kv_fill[r]], p[plan.kv_fill[r]]) for e, r, x, p in exited]
        exited = [g for g in exited if g[1].numel()]
        if exited:
            self._e3_kv_fill(fc, exited)
        return out

    def _e3_exit(self, e: int, plan: ExitPlan, layout: RowLayout, act: Active, out, exited):
        """Exit decisions at exit point `e`: exited rows write their head input
        and are recorded for KV fill; the rest are compacted. Returns the new
        active set and whether it changed."""
        r = act.rows                                              # rows that can leave at e:
        can = plan.may_exit[r] & (torch.isfinite(plan.threshold[e][r]) | ~torch.isnan(plan.rate[e][r]))
        cand = can.nonzero().squeeze(1)                           # active-row indices
        n_real = int((act.rows < layout.num_rows).sum())
        if cand.numel() == 0 or (plan.sync and cand.numel() != n_real):
            return act, False
        head_in = self.e3_head_input(e, act.h[cand], act.residual[cand])
        leave = self._e3_decide(e, plan, act.rows[cand], head_in, act.positions[cand], act.tokens[cand])
        if not bool(leave.any()) or (plan.sync and not bool(leave.all())):
            return act, False
        gone = cand[leave]
        out[act.rows[gone]] = head_in[leave]
        exited.append((e, act.rows[gone], act.h[gone] + act.residual[gone], act.positions[gone]))
        self.e3_stats.exited[e] = self.e3_stats.exited.get(e, 0) + int(gone.numel())
        self._e3_record_waits(act.waited[gone])
        keep = act.rows < layout.num_rows                 # padding rows need no more work
        keep[gone] = False
        c = compact(keep, act.h, act.residual, act.positions)  # fused gather (kernels/compact.py)
        m = int(c.num_keep)
        idx = c.keep_idx[:m]
        return Active(act.rows[idx], c.hidden[:m], c.residual[:m], c.positions[:m],
                      act.tokens[idx], act.waited[idx]), True

    # ---- E3 regrouping (policy e3) -------------------------------------
    def _e3_should_park(self, e: int, plan: ExitPlan, act: Active, resume) -> bool:
        """Park the group continuing past exit `e` when the next stage would
        run below its target batch, every row may park (decode rows of e3
        requests, under park_when: refill only while the scheduler can admit
        in their place; a prompt row makes the stage run anyway), and no
        token has reached its wait bound."""
        joining = resume.get(e)
        n = act.rows.numel() + (joining.rows.numel() if joining is not None else 0)
        if n >= self.e3.target_at(e) or not bool(plan.may_park[act.rows].all()):
            return False
        bound = self.e3.max_park_steps
        if bool((act.waited >= bound).any()):
            return False
        return joining is None or not bool((joining.waited >= bound).any())

    def _e3_park(self, e: int, act: Active, resume, layout: RowLayout, step) -> torch.Tensor:
        """Park the group (with tokens parked at `e` earlier that did not
        resume): returns its forward rows."""
        group = act.merge(resume.pop(e)) if e in resume else act
        req = layout.req_of_row[group.rows].tolist()
        pos, tok, waited = group.positions.tolist(), group.tokens.tolist(), group.waited.tolist()
        for i, j in enumerate(req):
            rid = step.req_ids[j]
            self.e3_parked[rid] = Parked(e, group.h[i].clone(), group.residual[i].clone(),
                                         pos[i], tok[i], waited[i] + 1)
            step.parked_req_ids.append(rid)
        self.e3_stats.parked += len(req)
        return group.rows

    def _e3_take_resumed(self, layout: RowLayout, act: Active, step) -> dict[int, Active]:
        """Rows of this step that resume a parked token: the same request, a
        decode row at the same position with the same input token. Every
        other parked state is dropped (its request finished, was aborted or
        preempted, or was not scheduled): recomputing such a token from stage
        0 is always correct, since re-running layers rewrites the same K/V."""
        parked, self.e3_parked = self.e3_parked, {}
        if not parked or step is None:
            return {}
        qsl = layout.query_start_loc.tolist()
        by_stage: dict[int, list[tuple[int, Parked]]] = {}
        for j, rid in enumerate(step.req_ids[:len(qsl) - 1]):
            st = parked.get(rid)
            if st is None:
                continue
            row = qsl[j]
            if (qsl[j + 1] - row == 1 and bool(layout.decode_row[row])
                    and int(act.positions[row]) == st.position and int(act.tokens[row]) == st.token):
                by_stage.setdefault(st.start, []).append((row, st))
        out = {}
        for start, items in by_stage.items():
            rows = torch.tensor([r for r, _ in items])
            out[start] = Active(rows, torch.stack([st.h for _, st in items]),
                                torch.stack([st.residual for _, st in items]), act.positions[rows],
                                act.tokens[rows], torch.tensor([st.waited for _, st in items]))
            self.e3_stats.resumed += len(items)
        return out

    FINISHED_KEPT = 4096

    def _e3_account(self, layout: RowLayout, step, exited, parked: torch.Tensor) -> None:
        """Per-request counters of this step: a decode token counts when it
        yields its token (exited or ran to the end), not when it parks."""
        L = self.e3_num_layers
        layers = torch.full((layout.num_rows,), L, dtype=torch.long)
        for e, r, _, _ in exited:
            layers[r] = e
        done = layout.decode_row.clone()
        done[parked] = False
        rows = done.nonzero().squeeze(1)
        reqs = self.e3_requests
        for j, n in zip(layout.req_of_row[rows].tolist(), layers[rows].tolist()):
            st = reqs[step.req_ids[j]]
            st.tokens += 1
            st.layers_run += n
            st.layers_full += L
            if n < L:
                st.exited[n] = st.exited.get(n, 0) + 1
        for j in layout.req_of_row[parked].tolist():
            reqs[step.req_ids[j]].parked += 1

    def e3_finish_requests(self, req_ids) -> None:
        """Finished or aborted: drop parked state, keep the request's counters
        among the last FINISHED_KEPT finished."""
        for rid in req_ids:
            self.e3_parked.pop(rid, None)
            # a request that never ran a decode step on this path reads as zeros
            self.e3_finished[rid] = self.e3_requests.pop(rid, None) or RequestExitStats()
        while len(self.e3_finished) > self.FINISHED_KEPT:
            self.e3_finished.popitem(last=False)

    def _e3_record_waits(self, waited: torch.Tensor) -> None:
        hist = self.e3_stats.park_wait_hist
        for w in waited[waited > 0].tolist():
            hist[w] = hist.get(w, 0) + 1

    def _e3_kv_fill(self, fc, groups) -> None:
        """KV fill for every layer each exited group skipped; at layer l the
        groups that exited at e <= l are filled together, in one batch."""
        model = self.model
        pending = sorted(groups, key=lambda g: g[0])
        states, pos, rows = [], [], []
        for l in range(pending[0][0], self.e3_num_layers):
            if pending and pending[0][0] <= l:
                while pending and pending[0][0] <= l:
                    _, r, x, p = pending.pop(0)
                    states.append(x); pos.append(p); rows.append(r)
                x_all, p_all, r_all = torch.cat(states), torch.cat(pos), torch.cat(rows)
            layer = model.layers[l]
            slots = fc.slot_mapping[layer.self_attn.attn.layer_name][r_all]
            kv_fill_layer(layer, x_all, p_all, slots, self.e3_kv_weights[l])
            self.e3_stats.kv_fill_rows += int(r_all.numel())


class E3LlamaForCausalLM(E3CausalLMMixin, LlamaForCausalLM):
    pass


class E3MistralForCausalLM(E3CausalLMMixin, MistralForCausalLM):
    pass


class E3Qwen2ForCausalLM(E3CausalLMMixin, Qwen2ForCausalLM):
    pass


class E3Qwen3ForCausalLM(E3CausalLMMixin, Qwen3ForCausalLM):
    pass
