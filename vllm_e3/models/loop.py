"""One forward of an E3 model when exits can fire: the stage loop.

    for each stage [a, b):   tokens parked at `a` rejoin; run the compiled
                             stage a..b-1 on the active rows
        at exit b:           decide which decode rows exit; exited rows write
                             their head input and are recorded for KV fill;
                             the rest are compacted and attention restricted
                             to them; under policy e3 a small continuing
                             group parks
    finally:                 final norm for the rows that ran to the end;
                             per-request counters; KV fill for every layer an
                             exited row skipped

Under pipeline parallelism each rank runs this loop over its own layers
(`vllm_e3.parallel.PipelineRank`): it decides the exits inside them, sends
the rows that exited with their head input and exit layer, and fills the K/V
of its layers for rows that exited on any rank before them. The last rank
yields every row's head input and keeps the per-request counters; engine
counters are per rank, each counting what it ran and decided.

The model (`E3CausalLMMixin`) supplies weights and what they compute: the
compiled stages, ramps and exit decisions, the K/V rows for the fill. The
request state this loop reads and writes (rules, parking lot, counters,
engine counters) is the runner's (`vllm_e3.runtime.E3Runtime`), reached
through the step context. A `StageLoop` lives for one forward.
"""
from __future__ import annotations

import torch

from ..exits import Active, ExitPlan, Parked, RowLayout, audit_mask, kv_fill_layer
from ..kernels import compact
from ..profile import timed


class StageLoop:
    def __init__(self, model, step, fc, view):
        self.model = model                  # the E3 *ForCausalLM
        self.cfg = model.e3
        self.L = model.e3_num_layers
        self.step = step                    # vllm_e3.step.StepContext
        self.rt = step.runtime              # vllm_e3.runtime.E3Runtime
        self.stats = step.runtime.stats
        self.prof = step.runtime.profile    # vllm_e3.profile.StepProfile, or None
        self.fc = fc
        self.view = view                    # vllm_e3.attention.AttentionView

    def run(self, input_ids, positions, inputs_embeds, intermediate_tensors=None):
        """[N, d]: per row, the state the LM head reads; on a pipeline rank
        but the last, the IntermediateTensors for the next one."""
        backbone, stats, cfg, step = self.model.model, self.stats, self.cfg, self.step
        rank = self.model.e3_rank
        residual = arrived = None
        if intermediate_tensors is None:
            h = backbone.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
            out = torch.zeros_like(h)
        else:                               # from the previous pipeline rank
            h, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
            out, arrived = intermediate_tensors["e3_out"].clone(), intermediate_tensors["e3_exit"]
        layout = self.layout = RowLayout.from_step(step, positions)
        plan = self.plan = ExitPlan.build(cfg, layout, h.shape[0], step)
        act = Active(torch.arange(h.shape[0]), h, residual, positions, input_ids,
                     torch.zeros(h.shape[0], dtype=torch.long))
        # (exit, forward rows [m], pre-ramp state [m, d], positions [m])
        self.exited: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.audits: dict[int, Active] = {}               # exit -> exited rows the audit runs on
        restricted = arrived is not None and bool((arrived > 0).any())
        if restricted:                      # rows that exited on an earlier rank
            for e in torch.unique(arrived[arrived > 0]).tolist():
                r = (arrived == e).nonzero().squeeze(1)
                self.exited.append((e, r, h[r] + residual[r], positions[r]))
            act = act.take(((arrived == 0) & (act.rows < layout.num_rows)).nonzero().squeeze(1))
        resume = self._take_resumed(act)                   # stage start -> Active
        if resume:
            keep = torch.ones(act.rows.numel(), dtype=torch.bool)
            keep[torch.cat([r.rows for r in resume.values()])] = False
            act = act.take(keep.nonzero().squeeze(1))
        num_reqs = layout.num_reqs
        if rank.last:          # step and request counters: the rank that yields every token
            # a resumed token was counted in the step that parked it
            n_decode = int(layout.decode_row.sum()) - sum(int(r.rows.numel()) for r in resume.values())
            stats.steps += 1
            stats.step_reqs += num_reqs
            stats.step_reqs_max = max(stats.step_reqs_max, num_reqs)
            stats.decode_tokens += n_decode
            stats.layers_full += n_decode * self.L
        restricted |= bool(resume)
        parked_rows: list[torch.Tensor] = []
        try:
            for start, end in rank.ranges:
                if start in resume:                        # parked tokens rejoin here
                    act = act.merge(resume.pop(start)) if act.rows.numel() else resume.pop(start)
                    restricted = True
                if act.rows.numel() == 0:                  # never call a stage with 0 rows
                    continue
                if restricted:
                    self.view.restrict(act.rows, torch.unique_consecutive(layout.req_of_row[act.rows]))
                    restricted = False
                # compiled stage on the m >= 1 active rows: [m] positions, [m, d] states
                with timed(self.prof, "stage", start, end, act.rows.numel()):
                    act.h, act.residual = self.model.e3_stages[start](act.positions, act.h, act.residual)
                n_dec = int(plan.decode[act.rows].sum())
                stats.layers_run += n_dec * (end - start)
                if n_dec:  # batch sizes a stage ran at, counted in decode tokens
                    stats.stage_rows[start] = stats.stage_rows.get(start, 0) + n_dec
                    stats.stage_runs[start] = stats.stage_runs.get(start, 0) + 1
                if end not in rank.decides:               # the model's or this rank's end
                    continue
                with timed(self.prof, "exit"):
                    act, gone = self._exit(end, act, out)
                    restricted |= gone
                    if act.rows.numel() and self._should_park(end, act, resume):
                        parked_rows.append(self._park(end, act, resume))
                        act = act.take(act.rows[:0])
            if act.rows.numel() and rank.last:
                out[act.rows] = backbone.norm(act.h, act.residual)[0]
                self._record_waits(act.waited)
            if self.audits:
                with timed(self.prof, "audit", sum(int(g.rows.numel()) for g in self.audits.values())):
                    self._audit(out)
        finally:
            self.view.restore()
        if rank.last:
            stats.mixed_exit_steps += len(self.exited) > 1
        # forward rows parked this step (padding rows dropped)
        parked = torch.cat(parked_rows) if parked_rows else torch.zeros(0, dtype=torch.long)
        parked = parked[parked < layout.num_rows]
        if parked.numel():                  # their requests get no logits and no token
            skip = torch.zeros(num_reqs, dtype=torch.bool)
            skip[layout.req_of_row[parked]] = True
            step.no_logits = skip
        if rank.last:
            self._account(parked)
        # this rank's layers each exited group skipped: from max(e, lo)
        fill = [(max(e, rank.lo), r[plan.kv_fill[r]], x[plan.kv_fill[r]], p[plan.kv_fill[r]])
                for e, r, x, p in self.exited if max(e, rank.lo) < rank.hi]
        fill = [g for g in fill if g[1].numel()]
        if fill:
            with timed(self.prof, "fill", sum(int(g[1].numel()) * (rank.hi - g[0]) for g in fill)):
                self._kv_fill(fill)
        if self.prof is not None and self.prof.cur is not None:
            cur = self.prof.cur
            cur["reqs"], cur["rows"], cur["parked"] = num_reqs, layout.num_rows, int(parked.numel())
            cur["prompt_rows"] = layout.num_rows - int(layout.decode_row.sum())
        if not rank.last:
            return self._send(out, act)
        return out

    def _send(self, out: torch.Tensor, act: Active):
        """What the next pipeline rank needs (vllm_e3.parallel, PipelineRank.send): the
        running rows' state, and each exited row's exit layer, head input and
        pre-ramp state (as hidden_states, with residual 0)."""
        hidden, residual = torch.zeros_like(out), torch.zeros_like(out)
        exit_of = torch.zeros(out.shape[0], dtype=torch.long)
        for e, r, x, _ in self.exited:
            hidden[r] = x
            exit_of[r] = e
        if act.rows.numel():
            hidden[act.rows] = act.h
            residual[act.rows] = act.residual
        return self.model.e3_rank.send(hidden, residual, out, exit_of)

    # ---- exits ---------------------------------------------------------
    def _exit(self, e: int, act: Active, out: torch.Tensor) -> tuple[Active, bool]:
        """Exit decisions at exit point `e`: exited rows write their head input
        and are recorded for KV fill; the rest are compacted. Returns the new
        active set and whether it changed."""
        plan, layout = self.plan, self.layout
        r = act.rows                                              # rows that can leave at e:
        can = plan.may_exit[r] & (torch.isfinite(plan.threshold[e][r]) | ~torch.isnan(plan.rate[e][r]))
        cand = can.nonzero().squeeze(1)                           # active-row indices
        n_real = int((act.rows < layout.num_rows).sum())
        if cand.numel() == 0 or (plan.sync and cand.numel() != n_real):
            return act, False
        head_in = self.model.e3_head_input(e, act.h[cand], act.residual[cand])
        leave = self.model.e3_leave(e, plan, act.rows[cand], head_in, act.positions[cand], act.tokens[cand])
        if not bool(leave.any()) or (plan.sync and not bool(leave.all())):
            return act, False
        gone = cand[leave]
        out[act.rows[gone]] = head_in[leave]
        if self.cfg.audit_rate > 0.0:
            sel = gone[audit_mask(self.cfg.seed, e, self.cfg.audit_rate, act.positions[gone], act.tokens[gone])]
            if sel.numel():
                self.audits[e] = act.take(sel)
        self.exited.append((e, act.rows[gone], act.h[gone] + act.residual[gone], act.positions[gone]))
        self.stats.exited[e] = self.stats.exited.get(e, 0) + int(gone.numel())
        self._record_waits(act.waited[gone])
        keep = act.rows < layout.num_rows                 # padding rows need no more work
        keep[gone] = False
        c = compact(keep, act.h, act.residual, act.positions)  # fused gather (kernels/compact.py)
        m = int(c.num_keep)
        idx = c.keep_idx[:m]
        return Active(act.rows[idx], c.hidden[:m], c.residual[:m], c.positions[:m],
                      act.tokens[idx], act.waited[idx]), True

    # ---- online audit (E3Config.audit_rate) ------------------------------
    def _audit(self, out: torch.Tensor) -> None:
        """Run the audited exited rows through the layers they skipped (each
        group joins at the stage its exit starts, attention restricted to
        them) and count where the ramp's top-1 (from `out`, the head input
        they exited with) is the full model's. Their K/V of those layers is
        written here and then overwritten by the KV fill, so what later
        tokens see is what an unaudited run leaves."""
        model, L = self.model, self.L
        exit_of = torch.full((self.layout.num_rows,), -1, dtype=torch.long)
        for e, g in self.audits.items():
            exit_of[g.rows] = e
        aud = None
        for start, _ in self.cfg.stages(L):
            g = self.audits.pop(start, None)
            if g is not None:
                aud = g if aud is None else aud.merge(g)
            if aud is None:
                continue
            self.view.restrict(aud.rows, torch.unique_consecutive(self.layout.req_of_row[aud.rows]))
            aud.h, aud.residual = model.e3_stages[start](aud.positions, aud.h, aud.residual)
        final = model.model.norm(aud.h, aud.residual)[0]
        logits = model.logits_processor(model.lm_head, torch.cat([final, out[aud.rows]]))
        top = logits.argmax(-1)
        n = aud.rows.numel()
        agree = top[:n] == top[n:]
        for e, a in zip(exit_of[aud.rows].tolist(), agree.tolist()):
            self.stats.audited[e] = self.stats.audited.get(e, 0) + 1
            self.stats.audit_agreed[e] = self.stats.audit_agreed.get(e, 0) + int(a)

    # ---- E3 regrouping (policy e3) -------------------------------------
    def _should_park(self, e: int, act: Active, resume: dict[int, Active]) -> bool:
        """Park the group continuing past exit `e` when the next stage would
        run below its target batch, every row may park (decode rows of e3
        requests, under park_when: refill only while the scheduler can admit
        in their place; a prompt row makes the stage run anyway), and no
        token has reached its wait bound."""
        if not self.model.e3_rank.single:    # parking is one-rank only (patch_arg_utils)
            return False
        joining = resume.get(e)
        n = act.rows.numel() + (joining.rows.numel() if joining is not None else 0)
        if n >= self.cfg.target_at(e) or not bool(self.plan.may_park[act.rows].all()):
            return False
        bound = self.cfg.max_park_steps
        if bool((act.waited >= bound).any()):
            return False
        return joining is None or not bool((joining.waited >= bound).any())

    def _park(self, e: int, act: Active, resume: dict[int, Active]) -> torch.Tensor:
        """Park the group (with tokens parked at `e` earlier that did not
        resume) in the runtime's parking lot: returns its forward rows."""
        group = act.merge(resume.pop(e)) if e in resume else act
        req = self.layout.req_of_row[group.rows].tolist()
        pos, tok, waited = group.positions.tolist(), group.tokens.tolist(), group.waited.tolist()
        for i, j in enumerate(req):
            rid = self.step.req_ids[j]
            self.rt.parking.park(rid, Parked(e, group.h[i].clone(), group.residual[i].clone(),
                                             pos[i], tok[i], waited[i] + 1))
            self.step.parked_req_ids.append(rid)
        self.stats.parked += len(req)
        return group.rows

    def _take_resumed(self, act: Active) -> dict[int, Active]:
        """Rows of this step that resume a parked token: the same request, a
        decode row at the same position with the same input token. Every
        other parked state is dropped (its request finished, was aborted or
        preempted, or was not scheduled): recomputing such a token from stage
        0 is always correct, since re-running layers rewrites the same K/V."""
        parked = self.rt.parking.take_all()
        if not parked:
            return {}
        layout = self.layout
        qsl = layout.query_start_loc.tolist()
        by_stage: dict[int, list[tuple[int, Parked]]] = {}
        for j, rid in enumerate(self.step.req_ids[:len(qsl) - 1]):
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
            self.stats.resumed += len(items)
        return out

    # ---- bookkeeping ---------------------------------------------------
    def _account(self, parked: torch.Tensor) -> None:
        """Per-request counters of this step: a decode token counts when it
        yields its token (exited or ran to the end), not when it parks."""
        layout, L = self.layout, self.L
        layers = torch.full((layout.num_rows,), L, dtype=torch.long)
        for e, r, _, _ in self.exited:
            layers[r] = e
        done = layout.decode_row.clone()
        done[parked] = False
        rows = done.nonzero().squeeze(1)
        counters, req_ids = self.rt.counters, self.step.req_ids
        for j, n in zip(layout.req_of_row[rows].tolist(), layers[rows].tolist()):
            st = counters.of(req_ids[j])
            st.tokens += 1
            st.layers_run += n
            st.layers_full += L
            if n < L:
                st.exited[n] = st.exited.get(n, 0) + 1
        for j in layout.req_of_row[parked].tolist():
            counters.of(req_ids[j]).parked += 1

    def _record_waits(self, waited: torch.Tensor) -> None:
        hist = self.stats.park_wait_hist
        for w in waited[waited > 0].tolist():
            hist[w] = hist.get(w, 0) + 1

    def _kv_fill(self, groups) -> None:
        """KV fill for every layer each exited group skipped; at layer l the
        groups that exited at e <= l are filled together, in one batch; all
        layers at once where the model allows (vllm_e3.exits.StackedKVFill)."""
        layers, kv_weights = self.model.model.layers, self.model.e3_kv_weights
        pending = sorted(groups, key=lambda g: g[0])
        stack = self.model.e3_kv_stack
        if stack is not None and pending[0][0] >= stack.first:
            self.stats.kv_fill_rows += stack.fill(layers, self.fc.slot_mapping, pending)
            return
        states, pos, rows = [], [], []
        for l in range(pending[0][0], self.model.e3_rank.hi):
            if pending and pending[0][0] <= l:
                while pending and pending[0][0] <= l:
                    _, r, x, p = pending.pop(0)
                    states.append(x); pos.append(p); rows.append(r)
                x_all, p_all, r_all = torch.cat(states), torch.cat(pos), torch.cat(rows)
            layer = layers[l]
            slots = self.fc.slot_mapping[layer.self_attn.attn.layer_name][r_all]
            kv_fill_layer(layer, x_all, p_all, slots, kv_weights[l])
            self.stats.kv_fill_rows += int(r_all.numel())
