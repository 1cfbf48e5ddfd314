"""One forward of an E3 model when exits can fire: the stage loop.

    enter         embed (or receive from the previous pipeline rank); the
                  step's exit plan (per-row thresholds, draws, audit sample);
                  tokens parked in an earlier step that resume here
    for each stage [a, b):
                  tokens parked at `a` rejoin; attention restricted to the
                  running rows if they changed; the compiled stage runs its
                  layers and, at a deciding exit b, the exit decision and a
                  stable partition (vllm_e3.models.stage)
      boundary    the one host read: how many rows continue; the rest hand
                  their head input to the output and their pre-ramp state to
                  the KV fill; the next stage runs on views of the first rows
                  (no copy); under policy e3 a small continuing group parks
    leave         rows that ran to the end hand their head input (the last
                  stage's final norm) to the output; the online audit;
                  per-request counters; the KV fill of every layer an exited
                  row skipped; on a pipeline rank but the last, what the next
                  one needs

Under pipeline parallelism each rank runs this loop over its own layers
(`vllm_e3.models.parallel.PipelineRank`): it decides the exits inside them,
sends the rows that exited with their head input and exit layer, and fills
the K/V of its layers for rows that exited on any rank before them. The last
rank yields every row's head input and keeps the per-request counters; engine
counters are per rank, each counting what it ran and decided.

The model (`E3CausalLMMixin`) supplies the compiled stages (with their exit
heads) and the KV fill. The request state this loop reads and writes (rules,
parking lot, counters, engine counters) is the runner's
(`vllm_e3.runtime.E3Runtime`), reached through the step context. A
`StageLoop` lives for one forward.

Host reads (an `int()`, `bool()`, `.tolist()`, `nonzero` or mask index,
whose result depends on tensor data): one per deciding boundary under
policies `token` and `sync` on a decode-only step. A step with prompt rows
adds one per restriction (which requests remain); policy e3's park check,
the audit and pipeline arrivals add theirs (docs/design.md, "Host reads").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..profile import timed
from .kv_fill import FillGroup, kv_fill_layer
from .rows import ExitPlan, Parked, RowLayout
from .stage import DECIDE, FINAL

_SYNC = {False: torch.tensor(False), True: torch.tensor(True)}


@dataclass
class Running:
    """The rows a stage runs, in ascending forward-row order."""
    rows: torch.Tensor               # [m] forward rows
    positions: torch.Tensor          # [m]
    hidden: torch.Tensor             # [m, d]
    residual: torch.Tensor | None    # [m, d] (None before the first layer)
    thr: torch.Tensor                # [m, E] effective thresholds (vllm_e3.models.rows)
    n: int                           # m, on the host
    prompt: int                      # prompt rows among them, on the host

    def take(self, idx: torch.Tensor, n: int, prompt: int) -> "Running":
        return Running(self.rows[idx], self.positions[idx], self.hidden[idx],
                       None if self.residual is None else self.residual[idx], self.thr[idx], n, prompt)

    def merge(self, other: "Running") -> "Running":
        """Union with `other` (disjoint rows) in forward-row order, so the
        restricted attention metadata stays in request order."""
        rows = torch.cat([self.rows, other.rows])
        order = torch.argsort(rows)
        cat = lambda a, b: torch.cat([a, b])[order]
        return Running(rows[order], cat(self.positions, other.positions), cat(self.hidden, other.hidden),
                       cat(self.residual, other.residual), cat(self.thr, other.thr), self.n + other.n,
                       self.prompt + other.prompt)


@dataclass
class Exited:
    """Rows that left at exit `e` this step (views of a stage's outputs)."""
    e: int
    rows: torch.Tensor        # [c]
    hidden: torch.Tensor      # [c, d] pre-ramp hidden ...
    residual: torch.Tensor    # [c, d] ... and residual: x = hidden + residual
    positions: torch.Tensor   # [c]
    count: int


class StageLoop:
    def __init__(self, model, step, fc, view, input_ids, positions, inputs_embeds, intermediate_tensors):
        self.model = model                  # the E3 *ForCausalLM
        self.cfg = model.e3
        self.rank = model.e3_rank           # vllm_e3.models.parallel.PipelineRank
        self.L = model.e3_num_layers
        self.step = step                    # vllm_e3.models.step.StepContext
        self.rt = step.runtime              # vllm_e3.runtime.E3Runtime
        self.stats = step.runtime.stats
        self.prof = step.runtime.profile    # vllm_e3.profile.StepProfile, or None
        self.fc = fc
        self.view = view                    # vllm_e3.models.attention.AttentionView
        self.input_ids, self.positions = input_ids, positions
        self.inputs_embeds, self.intermediate = inputs_embeds, intermediate_tensors
        self.layout = RowLayout.from_step(step, positions)
        with timed(self.prof, "plan"):
            self.plan = ExitPlan.build(self.cfg, self.layout, positions.shape[0], step, positions, input_ids)
        self.exited: list[Exited] = []      # this step's, arrivals from earlier pipeline ranks included
        self.audits: dict[int, Running] = {}        # exit -> exited rows the audit runs on
        self.waited: dict[int, int] = {}            # forward row -> steps waited parked (resumed rows)
        self.parked_rows: list[int] = []
        self.out: torch.Tensor | None = None        # [N, d] head input per row

    def run(self):
        """[N, d]: per row, the state the LM head reads; on a pipeline rank
        but the last, the IntermediateTensors for the next one."""
        run, resume = self._enter()
        try:
            run = self._run_stages(run, resume)
            if self.plan.audit is not None:
                self._draw_audit()
                if self.audits:
                    with timed(self.prof, "audit", sum(g.n for g in self.audits.values())):
                        self._audit()
        finally:
            self.view.restore()
        return self._leave(run)

    # ---- enter ---------------------------------------------------------
    def _enter(self) -> tuple[Running, dict[int, Running]]:
        """The rows the first stage runs, and the parked rows that resume at
        later stages (by stage start)."""
        layout, it = self.layout, self.intermediate
        n_real = layout.num_rows
        if it is None:
            embeds = self.inputs_embeds
            h = self.model.model.embed_input_ids(self.input_ids) if embeds is None else embeds
            residual = None
        else:                               # from the previous pipeline rank
            h, residual = it["hidden_states"], it["residual"]
        self.out = torch.zeros_like(h) if it is None else it["e3_out"].clone()
        rows = torch.arange(n_real)
        run = Running(rows, self.positions[:n_real], h[:n_real],
                      None if residual is None else residual[:n_real], self.plan.thr[:n_real], n_real,
                      layout.num_prompt_rows)
        if it is not None:
            run = self._arrivals(run, it["e3_exit"][:n_real])
        resume = self._take_resumed(run)
        if resume:
            keep = torch.ones(n_real, dtype=torch.bool)
            for r in resume.values():
                keep[r.rows] = False
            idx = keep.nonzero().squeeze(1)
            run = run.take(idx, int(idx.numel()), run.prompt)
        self._count_step(sum(r.n for r in resume.values()))
        return run, resume

    def _arrivals(self, run: Running, exit_of: torch.Tensor) -> Running:
        """Rows that exited on an earlier pipeline rank (their pre-ramp state
        in hidden_states, residual 0): recorded as exited, for this rank's KV
        fill, the next rank and the counters; the others keep running."""
        gone = exit_of > 0
        if not bool(gone.any()):
            return run
        for e in torch.unique(exit_of[gone]).tolist():
            r = (exit_of == e).nonzero().squeeze(1)
            self.exited.append(Exited(e, r, run.hidden[r], run.residual[r], run.positions[r], int(r.numel())))
        idx = (~gone).nonzero().squeeze(1)
        return run.take(idx, int(idx.numel()), run.prompt)

    def _count_step(self, resumed: int) -> None:
        """Step counters, on the rank that yields every token; a resumed token
        was counted in the step that parked it."""
        if not self.rank.last:
            return
        stats, layout = self.stats, self.layout
        n_decode = layout.num_decode - resumed
        stats.steps += 1
        stats.step_reqs += layout.num_reqs
        stats.step_reqs_max = max(stats.step_reqs_max, layout.num_reqs)
        stats.decode_tokens += n_decode
        stats.layers_full += n_decode * self.L

    # ---- the stages ------------------------------------------------------
    def _run_stages(self, run: Running, resume: dict[int, Running]) -> Running:
        stages = self.model.e3_stages
        sync = _SYNC[self.plan.sync]
        changed = run.n < self.layout.num_rows
        for start, end in self.rank.ranges:
            if start in resume:                              # parked tokens rejoin here
                joining = resume.pop(start)
                run = run.merge(joining) if run.n else joining
                changed = True
            if run.n == 0:                                   # never call a stage with 0 rows
                continue
            if changed:
                with timed(self.prof, "restrict"):
                    self._restrict(run)
                changed = False
            stage = stages[start]
            with timed(self.prof, "stage", start, end, run.n):
                res = stage(run.positions, run.hidden, run.residual, run.rows, run.thr, sync)
            self._count_stage(start, end, run)
            if stage.kind == FINAL:
                self.out.index_copy_(0, run.rows, res)
                self._record_waits(run)
                return Running(run.rows[:0], run.positions[:0], res[:0], None, run.thr[:0], 0, 0)
            if stage.kind != DECIDE:
                run.hidden, run.residual = res
                continue
            with timed(self.prof, "exit"):
                run, changed = self._boundary(end, run, res)
                if run.n and self._should_park(end, run, resume):
                    self._park(end, run, resume)
                    run = run.take(run.rows[:0], 0, 0)
        return run

    def _restrict(self, run: Running) -> None:
        """Attention of the next stage on the running rows' requests."""
        layout = self.layout
        if layout.decode_only:                               # row i is request i
            self.view.restrict(run.rows, run.rows)
        else:                                                # a host read: which requests remain
            self.view.restrict(run.rows, torch.unique_consecutive(layout.req_of_row[run.rows]))

    def _count_stage(self, start: int, end: int, run: Running) -> None:
        n_dec = run.n - run.prompt
        self.stats.layers_run += n_dec * (end - start)
        if n_dec:  # batch sizes a stage ran at, counted in decode tokens
            self.stats.stage_rows[start] = self.stats.stage_rows.get(start, 0) + n_dec
            self.stats.stage_runs[start] = self.stats.stage_runs.get(start, 0) + 1

    def _boundary(self, e: int, run: Running, res) -> tuple[Running, bool]:
        """After exit `e`'s decision (in the stage's graph): the rows that
        leave hand their head input to the output and their state to the KV
        fill; the rest run on. Returns the running rows and whether they changed."""
        positions, hidden, residual, rows, thr, head_in, count = res
        k = int(count)                                       # the host read of the boundary
        gone = run.n - k
        if gone:
            self.out.index_copy_(0, rows[k:], head_in[k:])
            g = Exited(e, rows[k:], hidden[k:], residual[k:], positions[k:], gone)
            self.exited.append(g)
            self.stats.exited[e] = self.stats.exited.get(e, 0) + gone
            if self.waited:
                self._record_waits(g)
        nxt = Running(rows[:k], positions[:k], hidden[:k], residual[:k], thr[:k], k, run.prompt)
        return nxt, gone > 0

    # ---- online audit (E3Config.audit_rate) ------------------------------
    def _draw_audit(self) -> None:
        """The exited rows of this step the audit draws (ExitPlan.audit), by exit."""
        for g in self.exited:
            if g.e not in self.rank.decides:         # exited on an earlier pipeline rank
                continue
            sel = self.plan.audit[g.rows, self.cfg.exits.index(g.e)].nonzero().squeeze(1)
            if sel.numel():
                never = torch.full((int(sel.numel()), len(self.cfg.exits)), float("inf"))
                self.audits[g.e] = Running(g.rows[sel], g.positions[sel], g.hidden[sel], g.residual[sel],
                                           never, int(sel.numel()), 0)

    def _audit(self) -> None:
        """Run the audited exited rows through the layers they skipped (each
        group joins at the stage its exit starts, attention restricted to
        them, thresholds +inf so none leaves) and count where the ramp's
        top-1 (from `out`, the head input they exited with) is the full
        model's. Their K/V of those layers is written here and then
        overwritten by the KV fill, so what later tokens see is what an
        unaudited run leaves."""
        model = self.model
        exit_of = {}
        for e, g in self.audits.items():
            exit_of.update(dict.fromkeys(g.rows.tolist(), e))
        aud, final = None, None
        sync = _SYNC[False]
        for start, _ in self.rank.ranges:
            g = self.audits.pop(start, None)
            if g is not None:
                aud = g if aud is None else aud.merge(g)
            if aud is None:
                continue
            self._restrict(aud)
            stage = model.e3_stages[start]
            res = stage(aud.positions, aud.hidden, aud.residual, aud.rows, aud.thr, sync)
            if stage.kind == FINAL:
                final = res
            elif stage.kind == DECIDE:
                aud = Running(res[3], res[0], res[1], res[2], res[4], aud.n, 0)
            else:
                aud.hidden, aud.residual = res
        logits = model.logits_processor(model.lm_head, torch.cat([final, self.out[aud.rows]]))
        top = logits.argmax(-1)
        agree = (top[:aud.n] == top[aud.n:]).tolist()
        for r, a in zip(aud.rows.tolist(), agree):
            e = exit_of[r]
            self.stats.audited[e] = self.stats.audited.get(e, 0) + 1
            self.stats.audit_agreed[e] = self.stats.audit_agreed.get(e, 0) + int(a)

    # ---- E3 regrouping (policy e3) -------------------------------------
    def _should_park(self, e: int, run: Running, resume: dict[int, Running]) -> bool:
        """Park the group continuing past exit `e` when the next stage would
        run below its target batch, every row may park (decode rows of e3
        requests, under park_when: refill only while the scheduler can admit
        in their place; a prompt row makes the stage run anyway), and no
        token has reached its wait bound."""
        plan = self.plan
        if not plan.parks_any or not self.rank.single:     # parking is one-rank only (patch_arg_utils)
            return False
        joining = resume.get(e)
        n = run.n + (joining.n if joining is not None else 0)
        if n >= self.cfg.target_at(e) or run.prompt:
            return False
        if not plan.parks_all and not bool(plan.may_park[run.rows].all()):
            return False
        bound = self.cfg.max_park_steps
        rows = run.rows.tolist() + (joining.rows.tolist() if joining is not None else [])
        return all(self.waited.get(r, 0) < bound for r in rows)

    def _park(self, e: int, run: Running, resume: dict[int, Running]) -> None:
        """Park the group (with tokens parked at `e` earlier that did not
        resume) in the runtime's parking lot."""
        group = run.merge(resume.pop(e)) if e in resume else run
        rows = group.rows.tolist()
        req = self.layout.req_of_row[group.rows].tolist()
        pos, tok = group.positions.tolist(), self.input_ids[group.rows].tolist()
        for i, (r, j) in enumerate(zip(rows, req)):
            rid = self.step.req_ids[j]
            self.rt.parking.park(rid, Parked(e, group.hidden[i].clone(), group.residual[i].clone(),
                                             pos[i], tok[i], self.waited.get(r, 0) + 1))
            self.step.parked_req_ids.append(rid)
        self.stats.parked += len(rows)
        self.parked_rows += rows

    def _take_resumed(self, run: Running) -> dict[int, Running]:
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
                    and int(self.positions[row]) == st.position and int(self.input_ids[row]) == st.token):
                by_stage.setdefault(st.start, []).append((row, st))
        out = {}
        for start, items in by_stage.items():
            rows = torch.tensor([r for r, _ in items])
            out[start] = Running(rows, self.positions[rows], torch.stack([st.h for _, st in items]),
                                 torch.stack([st.residual for _, st in items]), self.plan.thr[rows],
                                 len(items), 0)
            self.waited.update((r, st.waited) for r, st in items)
            self.stats.resumed += len(items)
        return out

    def _record_waits(self, rows_of) -> None:
        """Tokens that yield now, by the steps they waited parked."""
        if not self.waited:
            return
        hist = self.stats.park_wait_hist
        for r in rows_of.rows.tolist():
            w = self.waited.get(r, 0)
            if w:
                hist[w] = hist.get(w, 0) + 1

    # ---- leave ---------------------------------------------------------
    def _leave(self, run: Running):
        rank, layout = self.rank, self.layout
        if rank.last:
            self.stats.mixed_exit_steps += len(self.exited) > 1
        parked = self.parked_rows
        if parked:                          # their requests get no logits and no token
            skip = torch.zeros(layout.num_reqs, dtype=torch.bool)
            skip[layout.req_of_row[torch.tensor(parked)]] = True
            self.step.no_logits = skip
        if rank.last:
            self._account(parked)
        self._fill()
        if self.prof is not None and self.prof.cur is not None:
            cur = self.prof.cur
            cur["reqs"], cur["rows"], cur["parked"] = layout.num_reqs, layout.num_rows, len(parked)
            cur["prompt_rows"] = layout.num_prompt_rows
        if not rank.last:
            return self._send(run)
        return self.out

    def _account(self, parked: list[int]) -> None:
        """Per-request counters of this step: a decode token counts when it
        yields its token (exited or ran to the end), not when it parks."""
        layout, L = self.layout, self.L
        layers = torch.full((layout.num_rows,), L, dtype=torch.long)
        for g in self.exited:
            layers[g.rows] = g.e
        done = layout.decode_row.clone()
        if parked:
            done[torch.tensor(parked)] = False
        rows = done.nonzero().squeeze(1)
        counters, req_ids = self.rt.counters, self.step.req_ids
        for j, n in zip(layout.req_of_row[rows].tolist(), layers[rows].tolist()):
            st = counters.of(req_ids[j])
            st.tokens += 1
            st.layers_run += n
            st.layers_full += L
            if n < L:
                st.exited[n] = st.exited.get(n, 0) + 1
        for j in layout.req_of_row[torch.tensor(parked, dtype=torch.long)].tolist():
            counters.of(req_ids[j]).parked += 1

    def _fill(self) -> None:
        """KV fill for every layer of this rank each exited row skipped
        (vllm_e3.models.kv_fill), for requests that fill (all but a test
        override's)."""
        rank, plan = self.rank, self.plan
        groups = []
        for g in self.exited:
            start = max(g.e, rank.lo)
            if start < rank.hi:
                groups.append(FillGroup(start, g.rows, g.hidden + g.residual, g.positions))
        if not plan.fill_all:
            groups = [FillGroup(g.start, g.rows[m], g.x[m], g.positions[m])
                      for g in groups for m in [plan.kv_fill[g.rows].nonzero().squeeze(1)]]
        groups = sorted((g for g in groups if g.count), key=lambda g: g.start)
        if not groups:
            return
        with timed(self.prof, "fill", sum(g.count * (rank.hi - g.start) for g in groups)):
            stack = self.model.e3_kv_stack
            if stack is not None and groups[0].start >= stack.first:
                self.stats.kv_fill_rows += stack.fill(self.fc.slot_mapping, groups)
            else:
                self._fill_per_layer(groups)

    def _fill_per_layer(self, groups: list[FillGroup]) -> None:
        """At layer l the groups that exited at e <= l, in one batch."""
        layers, kv_weights = self.model.model.layers, self.model.e3_kv_weights
        pending = list(groups)
        live: list[FillGroup] = []
        for l in range(pending[0].start, self.rank.hi):
            while pending and pending[0].start <= l:
                live.append(pending.pop(0))
            x, p, r = (torch.cat([getattr(g, f) for g in live]) for f in ("x", "positions", "rows"))
            layer = layers[l]
            slots = self.fc.slot_mapping[layer.self_attn.attn.layer_name][r]
            kv_fill_layer(layer, x, p, slots, kv_weights[l])
            self.stats.kv_fill_rows += int(r.numel())

    def _send(self, run: Running):
        """What the next pipeline rank needs (PipelineRank.send): the running
        rows' state, and each exited row's exit layer, head input and
        pre-ramp state (as hidden_states, with residual 0)."""
        out = self.out
        hidden, residual = torch.zeros_like(out), torch.zeros_like(out)
        exit_of = torch.zeros(out.shape[0], dtype=torch.long)
        for g in self.exited:
            hidden.index_copy_(0, g.rows, g.hidden + g.residual)
            exit_of[g.rows] = g.e
        if run.n:
            hidden.index_copy_(0, run.rows, run.hidden)
            residual.index_copy_(0, run.rows, run.residual)
        return self.rank.send(hidden, residual, out, exit_of)
