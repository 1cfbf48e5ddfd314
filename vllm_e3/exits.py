"""The early-exit step inside one vLLM forward: rows, decisions, attention
slices and KV fill. Knows vLLM's forward context and attention layers; never
the scheduler, the CLI or training (docs/design.md, "Which part may know
which").

Glossary
- row: one token of the flattened batch the model's forward sees; rows map to
  requests through the attention metadata's `query_start_loc`.
- decode row: the single new token of a request whose prompt is done; only
  decode rows may exit (prompt tokens run the whole model).
- active rows: rows still running at the current stage, compacted to the front.
- KV fill: K/V of every layer a token skipped, written from its pre-ramp state
  through each skipped layer's own input norm -> K/V projection -> RoPE ->
  cache write, so later tokens never attend to holes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass

import torch

from .knobs import FULL_RULES

_U64 = float(2**64)


def forced_exit_u(seed: int | str, e: int, position: int, token_id: int) -> float:
    """The synthetic profile's uniform draw for a token reaching exit `e`.

    First 8 bytes of sha256(f"{seed}:{e}:{position}:{token_id}"), big-endian,
    over 2**64: it depends only on what the forward sees, so every run and
    every policy makes the same decision, and a reference can reproduce it.
    """
    digest = hashlib.sha256(f"{seed}:{e}:{position}:{token_id}".encode()).digest()
    return struct.unpack(">Q", digest[:8])[0] / _U64


def forced_exit_mask(seed: int | str, e: int, rate: torch.Tensor, positions: torch.Tensor,
                     token_ids: torch.Tensor) -> torch.Tensor:
    """[n] bool: which rows leave at `e`, each under its own rate [n]."""
    out = rate >= 1.0
    mid = ((rate > 0.0) & (rate < 1.0)).nonzero().squeeze(1).tolist()
    if mid:
        pos, tok, r = positions[mid].tolist(), token_ids[mid].tolist(), rate[mid].tolist()
        out[mid] = torch.tensor(
            [forced_exit_u(seed, e, p, t) < q for p, t, q in zip(pos, tok, r)], dtype=torch.bool)
    return out


def audit_mask(seed: int, e: int, rate: float, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[n] bool: which tokens exiting at `e` the online audit checks (E3Config.audit_rate):
    the synthetic profile's draw under another key, so a reference can reproduce it."""
    return forced_exit_mask(f"audit{seed}", e, torch.full((positions.numel(),), float(rate)), positions, token_ids)


@dataclass
class RowLayout:
    """How the rows of one forward map to requests."""
    num_rows: int                 # real (unpadded) tokens
    query_start_loc: torch.Tensor  # [R + 1] int32
    req_of_row: torch.Tensor       # [num_rows] int64
    decode_row: torch.Tensor       # [num_rows] bool: may exit

    @property
    def num_reqs(self) -> int:
        return self.query_start_loc.numel() - 1

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
            return cls(n, qsl, req_of_row, torch.zeros(n, dtype=torch.bool))
        past_prompt = positions[:n].long() >= prompt_lens[:qlen.numel()][req_of_row]
        return cls(n, qsl, req_of_row, (qlen == 1)[req_of_row] & past_prompt)

    @classmethod
    def from_step(cls, step, positions: torch.Tensor) -> "RowLayout":
        """The rows of the step's requests (`step.req_ids`; padding requests
        the runner may add are left out), from the common attention
        metadata the runner captured."""
        cm = step.attn.first()
        qsl = cm.query_start_loc_cpu[:len(step.req_ids) + 1]
        return cls.build(qsl, positions, step.prompt_lens)


def kv_fill_layer(layer, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                  kv_weight: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
    """Write layer's K/V for tokens that skipped it, from their pre-ramp state.

    x [m, d]: hidden + residual after the token's exit layer (what the first
    skipped layer would have read); positions [m]; slots [m] cache slots.
    kv_weight: the (weight [2 * kv_size, d], bias) rows of qkv_proj for K and V,
    or None to run the whole qkv_proj.
    Reuses the layer's own modules: input norm -> qkv_proj -> (k_norm) ->
    RoPE on K alone -> the backend's cache write, so the write is the one the
    full layer would make from that state.
    """
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    if kv_weight is not None:  # the K/V rows of qkv_proj alone (E3 model keeps them)
        k, v = torch.nn.functional.linear(h, *kv_weight).split([attn.kv_size, attn.kv_size], dim=-1)
    else:
        qkv, _ = attn.qkv_proj(h)
        _, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    head_dim = attn.head_dim
    if hasattr(attn, "k_norm"):  # Qwen3: per-head RMSNorm on K before RoPE
        k = attn.k_norm(k.reshape(-1, attn.num_kv_heads, head_dim)).reshape(k.shape)
    k = k.contiguous()
    # K alone, passed as RoPE's query: use the returned tensor -- vLLM's CPU op
    # rotates in place, but under compilation (custom ops off) the native
    # path returns a new one and leaves `k` unrotated
    k, _ = attn.rotary_emb(positions, k, None)
    a = attn.attn
    a.impl.do_kv_cache_update(
        a,
        k.view(-1, a.num_kv_heads, a.head_size),
        v.contiguous().view(-1, a.num_kv_heads, a.head_size),
        a.kv_cache,
        slots,
    )


class StackedKVFill:
    """The KV fill of every skipped layer at once, where the layers allow it:
    one RMSNorm statistic per row (every skipped layer reads the same
    pre-ramp state), one batched K/V projection over the stacked weights of
    layers `first..L-1`, one RoPE call over all those layers' K heads, then
    the backend's cache write per layer (rows sorted by exit, so the rows a
    layer needs are a prefix). The per-layer path (`kv_fill_layer`) costs a
    norm, a projection, a RoPE and a write per layer; on this model's small
    decode groups those fixed costs dominate. Under pipeline parallelism the
    layers are this rank's, `first..hi-1`.

    The arithmetic is RMSNorm's own (float32 statistic, x * rsqrt(mean(x^2) +
    eps), then the weight) and the layer's K/V rows of qkv_proj."""

    def __init__(self, layers, kv_weights, first: int, hi: int):
        attn0 = layers[first].self_attn
        self.first, self.kv_size = first, attn0.kv_size
        self.rotary = attn0.rotary_emb
        self.eps = float(layers[first].input_layernorm.variance_epsilon)
        self.norm_w = torch.stack([layers[l].input_layernorm.weight.detach()
                                   for l in range(first, hi)])                    # [n, d]
        self.w = torch.stack([kv_weights[l][0] for l in range(first, hi)])        # [n, 2kv, d]
        biases = [kv_weights[l][1] for l in range(first, hi)]
        self.b = None if biases[0] is None else torch.stack(biases)[:, None, :]  # [n, 1, 2kv]

    @classmethod
    def build(cls, layers, kv_weights, first: int, hi: int | None = None) -> "StackedKVFill | None":
        """None where a layer needs the per-layer path: a quantized or packed
        projection, K normalisation (Qwen3), a norm other than plain RMSNorm,
        or layers with different RoPE or epsilon. `hi`: the end of this
        rank's layers (default all)."""
        hi = len(layers) if hi is None else hi
        rng = range(first, hi)
        if not rng or any(kv_weights[l] is None for l in rng):
            return None
        a0, n0 = layers[first].self_attn, layers[first].input_layernorm
        for l in rng:
            a, n = layers[l].self_attn, layers[l].input_layernorm
            if (hasattr(a, "k_norm") or a.rotary_emb is not a0.rotary_emb or type(n) is not type(n0)
                    or getattr(n, "variance_epsilon", None) != getattr(n0, "variance_epsilon", None)
                    or getattr(n, "weight", None) is None or type(n).__name__ != "RMSNorm"
                    or (kv_weights[l][1] is None) != (kv_weights[first][1] is None)):
                return None
        return cls(layers, kv_weights, first, hi)

    def fill(self, layers, slot_mapping, groups) -> int:
        """groups: (exit e >= first, forward rows, pre-ramp state [m, d],
        positions [m]) in ascending e. Writes layers e..hi-1 of each group's
        rows; returns the row-layers written."""
        x = torch.cat([g[2] for g in groups])
        pos = torch.cat([g[3] for g in groups])
        rows = torch.cat([g[1] for g in groups])
        exit_of = torch.cat([torch.full((g[1].numel(),), g[0], dtype=torch.long) for g in groups])
        e0, m = groups[0][0], x.shape[0]
        j0 = e0 - self.first
        xf = x.float()
        xhat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        h = xhat[None] * self.norm_w[j0:, None, :]                      # [n, m, d]
        kv = torch.bmm(h, self.w[j0:].transpose(1, 2))                   # [n, m, 2kv]
        if self.b is not None:
            kv = kv + self.b[j0:]
        n = kv.shape[0]
        k = kv[..., :self.kv_size].transpose(0, 1).reshape(m, n * self.kv_size)
        k, _ = self.rotary(pos, k, None)          # every layer's K heads, one call
        k = k.view(m, n, self.kv_size)
        v = kv[..., self.kv_size:]
        done = 0
        for j in range(n):
            l = e0 + j
            cnt = int((exit_of <= l).sum())
            a = layers[l].self_attn.attn
            a.impl.do_kv_cache_update(
                a, k[:cnt, j].contiguous().view(cnt, a.num_kv_heads, a.head_size),
                v[j, :cnt].contiguous().view(cnt, a.num_kv_heads, a.head_size), a.kv_cache,
                slot_mapping[a.layer_name][rows[:cnt]])
            done += cnt
        return done


@dataclass
class Active:
    """The rows running the current stage, compacted, in forward-row order."""
    rows: torch.Tensor        # [M] forward row of each active row (ascending)
    h: torch.Tensor           # [M, d]
    residual: torch.Tensor | None   # [M, d] (None before the first layer)
    positions: torch.Tensor   # [M]
    tokens: torch.Tensor      # [M] input token ids
    waited: torch.Tensor      # [M] int: steps this token has waited parked

    def take(self, idx: torch.Tensor) -> "Active":
        return Active(self.rows[idx], self.h[idx],
                      None if self.residual is None else self.residual[idx],
                      self.positions[idx], self.tokens[idx], self.waited[idx])

    def merge(self, other: "Active") -> "Active":
        """Union with `other` (disjoint rows), kept in forward-row order so the
        sliced attention metadata stays in request order."""
        rows = torch.cat([self.rows, other.rows])
        order = torch.argsort(rows)
        cat = lambda a, b: torch.cat([a, b])[order]
        return Active(rows[order], cat(self.h, other.h), cat(self.residual, other.residual),
                      cat(self.positions, other.positions), cat(self.tokens, other.tokens),
                      cat(self.waited, other.waited))


@dataclass
class Parked:
    """A token waiting at the start of stage `start` (policy e3)."""
    start: int                # exit point where it resumes
    h: torch.Tensor           # [d] pre-ramp hidden after layer start-1
    residual: torch.Tensor    # [d]
    position: int
    token: int
    waited: int               # steps waited so far, this one included


@dataclass
class ExitPlan:
    """Per-row exit rules of one step, from the engine's E3Config and the
    requests' extras (vllm_e3.step). Rows index the forward's rows."""
    may_exit: torch.Tensor                 # [N] bool: decode row whose request may exit
    sync: bool                             # the step follows policy `sync`
    rate: dict[int, torch.Tensor]          # exit -> [N] forced rate, NaN = not forced
    threshold: dict[int, torch.Tensor]     # exit -> [N] fp32 confidence threshold, inf = never
    kv_fill: torch.Tensor                  # [N] bool
    may_park: torch.Tensor                 # [N] bool: decode row under policy e3
    decode: torch.Tensor                   # [N] bool: decode row (padding rows False)

    @classmethod
    def build(cls, cfg, layout: "RowLayout", n_rows: int, step) -> "ExitPlan":
        """From each request's rules, resolved at admission (`step.rules`,
        vllm_e3.knobs.RequestRules). No step context: nothing exits."""
        num_reqs = layout.num_reqs
        rules = step.rules[:num_reqs] if step is not None and len(step.rules) >= num_reqs else None
        rules = rules or [FULL_RULES] * num_reqs
        pad = n_rows - layout.num_rows
        req = layout.req_of_row

        def per_row(values, dtype, pad_value):
            t = torch.tensor(values, dtype=dtype)[req]
            return torch.cat([t, torch.full((pad,), pad_value, dtype=dtype)]) if pad else t

        may_exit = per_row([r.policy != "full" for r in rules], torch.bool, False)
        decode = torch.cat([layout.decode_row, torch.zeros(pad, dtype=torch.bool)]) if pad else layout.decode_row
        rate, threshold = {}, {}
        inf, nan = float("inf"), float("nan")
        for e in cfg.exits:
            rate[e] = per_row([r.force_exit.get(e, nan) for r in rules], torch.float32, nan)
            threshold[e] = per_row([r.thresholds.get(e, inf) for r in rules], torch.float32, inf)
        sync = num_reqs > 0 and all(r.policy == "sync" for r in rules)
        # parking needs the E3 runner (step context) to reschedule the request,
        # and under park_when "refill" a scheduler that can admit in its place
        may_park = per_row([r.policy == "e3" and step is not None and (r.park_when == "always" or step.refill)
                            for r in rules], torch.bool, False) & decode
        return cls(may_exit & decode, sync, rate, threshold, per_row([r.kv_fill for r in rules], torch.bool, True),
                   may_park, decode)


@dataclass
class ExitStats:
    """Per-worker counters (read by metrics later)."""
    steps: int = 0
    decode_tokens: int = 0       # decode tokens computed (a parked token once)
    exited: dict[int, int] = dataclasses.field(default_factory=dict)   # exit -> tokens
    layers_run: int = 0          # decoder layers run by decode tokens (a parked one: both parts)
    layers_full: int = 0         # the same had no token exited
    kv_fill_rows: int = 0        # sum over exited rows of layers filled
    mixed_exit_steps: int = 0    # steps whose tokens left at two or more exits
    parked: int = 0              # tokens parked (a token parked twice counts twice)
    resumed: int = 0             # parked tokens that resumed where they stopped
    park_wait_hist: dict[int, int] = dataclasses.field(default_factory=dict)  # steps waited -> tokens
    stage_rows: dict[int, int] = dataclasses.field(default_factory=dict)   # stage start -> decode rows run
    stage_runs: dict[int, int] = dataclasses.field(default_factory=dict)   # stage start -> runs with decode rows
    step_reqs: int = 0           # requests in the forwards, summed (mean in flight = step_reqs / steps)
    step_reqs_max: int = 0       # most requests in one forward (parked ones included)
    audited: dict[int, int] = dataclasses.field(default_factory=dict)      # exit -> exited tokens audited
    audit_agreed: dict[int, int] = dataclasses.field(default_factory=dict)  # exit -> ramp top-1 = full top-1

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RequestExitStats:
    """One request's decode tokens, as a client reads them (vllm_e3.stats)."""
    tokens: int = 0              # decode tokens produced (the prefill's token not included)
    layers_run: int = 0          # decoder layers they ran
    layers_full: int = 0         # the same without exits
    exited: dict[int, int] = dataclasses.field(default_factory=dict)   # exit -> tokens
    parked: int = 0              # times a token of it was parked

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
