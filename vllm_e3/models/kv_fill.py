"""KV fill: the K/V of every layer an exited token skipped, written from its
pre-ramp state (hidden + residual after its exit layer: what the first
skipped layer would have read) through each skipped layer's input norm ->
K/V projection -> (Qwen3: K norm) -> RoPE -> the backend's cache write, so
later tokens never attend to holes. This is the cost of an exit; the stage
loop counts it (`ExitStats.kv_fill_rows`).

Two ways, one result:
- `kv_fill_layer`: a layer's own modules, one layer at a time. Any layer
  (quantized or packed projections, Qwen3's K norm).
- `StackedKVFill`: every skipped layer at once where the layers allow it --
  one RMSNorm statistic per row (every skipped layer reads the same state),
  one batched projection over the stacked K/V weights of layers first..hi-1,
  one RoPE call over every layer's K heads, then per layer only the cache
  write, on views: the rows are sorted by exit layer, so the rows layer l
  needs are a prefix whose length the host already knows (the group sizes),
  and the slots are gathered once per KV-cache group (every layer of a group
  shares one slot-mapping tensor). No host read, no copy per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def kv_fill_layer(layer, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                  kv_weight: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
    """Write layer's K/V for tokens that skipped it, from their pre-ramp state.

    x [m, d]: hidden + residual after the token's exit layer; positions [m];
    slots [m] cache slots. kv_weight: the (weight [2 * kv_size, d], bias) rows
    of qkv_proj for K and V, or None to run the whole qkv_proj. RoPE is
    applied to K alone, so the write is the one the full layer would make
    from that state.
    """
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    if kv_weight is not None:  # the K/V rows of qkv_proj alone (captured by capture_kv_weights)
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
    a.impl.do_kv_cache_update(a, k.view(-1, a.num_kv_heads, a.head_size),
                              v.contiguous().view(-1, a.num_kv_heads, a.head_size), a.kv_cache, slots)


def capture_kv_weights(layers, owns) -> list[tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Each layer's K/V rows of `qkv_proj` (the fill needs K and V only; Q is
    ~60% of the projection on GQA models), copied now, before vLLM's CPU
    path may repack the weight for oneDNN. None for a layer another pipeline
    rank owns (`owns(l)` false) or whose projection is quantized."""
    out = []
    for l, layer in enumerate(layers):
        if not owns(l):
            out.append(None)
            continue
        attn = layer.self_attn
        proj = attn.qkv_proj
        w = getattr(proj, "weight", None)
        if type(proj.quant_method).__name__ != "UnquantizedLinearMethod" or w is None or w.ndim != 2:
            out.append(None)
            continue
        b = getattr(proj, "bias", None)
        out.append((w[attn.q_size:].detach().clone(), None if b is None else b[attn.q_size:].detach().clone()))
    return out


@dataclass
class FillGroup:
    """Rows that left at one exit, in the order the stage loop recorded them."""
    start: int                # first layer to fill: the exit point (or this rank's first layer)
    rows: torch.Tensor        # [c] forward rows
    x: torch.Tensor           # [c, d] pre-ramp state
    positions: torch.Tensor   # [c]

    @property
    def count(self) -> int:
        return int(self.rows.shape[0])


class StackedKVFill:
    """The KV fill of layers first..hi-1 at once (module docstring). The
    arithmetic is RMSNorm's own (float32 statistic, x * rsqrt(mean(x^2) +
    eps), then the weight) and the layer's K/V rows of qkv_proj."""

    def __init__(self, layers, kv_weights, first: int, hi: int):
        attn0 = layers[first].self_attn
        self.first, self.hi, self.kv_size = first, hi, attn0.kv_size
        self.rotary = attn0.rotary_emb
        self.eps = float(layers[first].input_layernorm.variance_epsilon)
        self.norm_w = torch.stack([layers[l].input_layernorm.weight.detach() for l in range(first, hi)])  # [n, d]
        self.w = torch.stack([kv_weights[l][0] for l in range(first, hi)])        # [n, 2kv, d]
        biases = [kv_weights[l][1] for l in range(first, hi)]
        self.b = None if biases[0] is None else torch.stack(biases)[:, None, :]  # [n, 1, 2kv]
        self.attn = [layers[l].self_attn.attn for l in range(first, hi)]

    def weights_of(self, l: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer l's K/V projection rows, as views of the stack."""
        j = l - self.first
        return self.w[j], None if self.b is None else self.b[j, 0]

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

    def fill(self, slot_mapping: dict[str, torch.Tensor], groups: list[FillGroup]) -> int:
        """Write layers g.start..hi-1 of each group's rows (`groups` in
        ascending start, every start >= first); returns the row-layers written."""
        x = groups[0].x if len(groups) == 1 else torch.cat([g.x for g in groups])
        pos = groups[0].positions if len(groups) == 1 else torch.cat([g.positions for g in groups])
        rows = groups[0].rows if len(groups) == 1 else torch.cat([g.rows for g in groups])
        j0, m = groups[0].start - self.first, x.shape[0]
        xf = x.float()
        xhat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        kv = torch.bmm(xhat[None] * self.norm_w[j0:, None, :], self.w[j0:].transpose(1, 2))   # [n, m, 2kv]
        if self.b is not None:
            kv = kv + self.b[j0:]
        n, kvs = kv.shape[0], self.kv_size
        k = kv[..., :kvs].transpose(0, 1).reshape(m, n * kvs)
        k, _ = self.rotary(pos, k, None)          # every layer's K heads, one call
        k = k.view(m, n, kvs)                     # row-major: k[:c, j] is a row-strided view
        # rows needed by each layer: a prefix (sorted by exit); counts from the group sizes
        ends, c, bounds = [], 0, [g.start - self.first for g in groups] + [self.hi - self.first]
        for gi, g in enumerate(groups):
            c += g.count
            ends += [c] * (bounds[gi + 1] - bounds[gi])
        slots_of: dict[int, torch.Tensor] = {}    # one gather per slot-mapping tensor (KV-cache group)
        done = 0
        for j, cnt in enumerate(ends):
            a = self.attn[j0 + j]
            table = slot_mapping[a.layer_name]
            slots = slots_of.get(id(table))
            if slots is None:
                slots = slots_of[id(table)] = table[rows]
            a.impl.do_kv_cache_update(a, k[:cnt, j].view(cnt, a.num_kv_heads, a.head_size),
                                      kv[j, :cnt, kvs:].view(cnt, a.num_kv_heads, a.head_size),
                                      a.kv_cache, slots[:cnt])
            done += cnt
        return done
