"""exit_confidence: LM-head confidence of ramp outputs, without materialising logits.

Math. Row i of `hidden` [n, d] is a ramp output that is already final-normed (what
the LM head reads). With the shared head `weight` [V, d], z_j = h_i . w_j (fp32
accumulation whatever the input dtype), and

    l1 = max_j z_j        a = min{j : z_j = l1}   (lowest index on ties, as torch.argmax)
    l2 = the second largest z of the multiset     (l2 = l1 when the top is tied)
    S  = sum_j exp(z_j - l1)      p1 = 1 / S      p2 = exp(l2 - l1) / S
    confidence = p1 ("max_prob") or p1 - p2 ("margin");  exit = confidence >= threshold_i

A threshold of +inf never exits (p1 <= 1). The statistics are computed online over
vocabulary tiles (Milakov & Gimelshein 2018, "Online normalizer calculation for
softmax"): a running (m1, a, m2, s) with s = sum exp(z - m1) merges a tile's
(t1, ta, t2, ts) as

    M  = max(m1, t1)      s  = s * exp(m1 - M) + ts * exp(t1 - M)
    m2 = max(min(m1, t1), m2, t2)      a = ta if t1 > m1 else a   (earlier tile wins ties)

The same merge combines the partial statistics of vocabulary splits.

Why fusion pays (bytes). Both ways read the head once: 2Vd bytes in bf16 (1.05 GB at
d=4096, V=128256). Unfused, `hidden @ weight.T` then writes [n, V] logits and softmax,
max and top-2 read them again: at n=256 in fp32 that is 131 MB written and ~400 MB
read, +50% traffic and 4+ launches. Fused, the logits live in registers; the only
extra traffic is the [S, n] partial statistics (16 B each, ~0.5 MB). At n=16 the
logits are small; there the gain is parallelism: a split-V grid keeps every SM
streaming the head while a 16-row GEMM + softmax would not.

Layout ("swap AB", the small-M GEMM trick of CUTLASS / TensorRT-LLM): each tile is
W_tile [BLOCK_V, K] @ H^T [K, BLOCK_N], so the vocabulary is the MMA's wide M side
and the few tokens its narrow N side (>= 16).

Shortlist (optional `index` [K], 1-D int32 | int64 vocabulary ids, any order, no
duplicates, 1 <= K <= V, each in [0, V): unchecked, as a host check would sync). The
same statistics over the K rows w_{index[j]} only:

    z_j = h_i . w_{index[j]}  (j < K)      softmax, p1 and p1 - p2 over these K logits
    argmax = index[a],  a = min{j : z_j = l1}

Ties resolve to the lowest position in the index, which for a sorted index is the
lowest token id. Why (bytes): the K rows that carry most of the model's output mass
approximate the full-vocabulary max-prob at K/V of the head's bytes and FLOPs; the
full head of the embedded 576 x 49152 model costs ~6-8 decoder layers per check, a
shortlist of K = 4096 rows about half of one. The kernel walks positions
j = 0..K-1 in tiles exactly as it walks the vocabulary without an index, and gathers
each row pointer through the index (weight_ptr + index[j] * stride_wv): it reads
those K rows of the head and never a per-call copy of weight[index]. A gathered row
is still contiguous along d, so the loads stay as coalesced as the plain walk.

Two launches: `_exit_confidence_kernel` (grid: row tiles x vocabulary splits) writes
per-split statistics; `_exit_confidence_reduce_kernel` merges the splits, applies the
measure and the per-row thresholds. Neither syncs with the host, `n` is not
specialised, and tile sizes are constexpr picked from a few caps of n, so a new
batch size does not recompile.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._triton import for_device, tl, triton

MEASURES = ("max_prob", "margin")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class ExitConfidence:
    confidence: torch.Tensor  # [n] fp32, the chosen measure
    argmax: torch.Tensor | None  # [n] int64, top-1 token id (lowest on ties*); None for a gate
    # * with a shortlist: the id at the lowest tied position in the index
    exit_mask: torch.Tensor  # [n] bool, confidence >= threshold


@triton.jit(do_not_specialize=["n", "tiles_per_split"])
def _exit_confidence_kernel(
    hidden_ptr,  # [n, d] fp32 | bf16 | fp16, any strides
    weight_ptr,  # [V, d] fp32 | bf16 | fp16, any strides
    index_ptr,  # [K] int32 | int64 shortlist of weight rows; None without HAS_INDEX
    part_m1_ptr,  # [S, n] fp32, running max
    part_m2_ptr,  # [S, n] fp32, running second max
    part_s_ptr,  # [S, n] fp32, sum of exp(z - m1)
    part_a_ptr,  # [S, n] int32, argmax (a position in the index with HAS_INDEX)
    n,
    d,
    V,  # rows walked: the vocabulary, or the K shortlist positions with HAS_INDEX
    tiles_per_split,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_i,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter only, see below
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < n
    offs_v = tl.arange(0, BLOCK_V)  # [BLOCK_V]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]

    m1 = tl.full([BLOCK_N], float("-inf"), tl.float32)
    m2 = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    a = tl.zeros([BLOCK_N], tl.int32)

    # The host gives every split at least one tile; the last split may hold fewer.
    first_tile = pid_s * tiles_per_split
    num_tiles = tl.minimum(tiles_per_split, tl.cdiv(V, BLOCK_V) - first_tile)
    for t in range(0, num_tiles):
        v0 = (first_tile + t) * BLOCK_V
        vs = v0 + offs_v
        v_mask = vs < V
        if HAS_INDEX:
            # The tile's head rows, gathered once per tile (not per K step).
            w_rows = tl.load(index_ptr + vs * stride_i, mask=v_mask, other=0).to(tl.int64)
        else:
            w_rows = vs.to(tl.int64)
        acc = tl.zeros([BLOCK_V, BLOCK_N], tl.float32)  # logits^T of this tile
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < d
            w = tl.load(
                # int64 row offsets: V * d can pass 2^31 elements (e.g. 256K x 8192)
                weight_ptr + w_rows[:, None] * stride_wv + ks[None, :] * stride_wd,
                mask=v_mask[:, None] & k_mask[None, :],
                other=0.0,
            )  # [BLOCK_V, BLOCK_K]
            h = tl.load(
                hidden_ptr + rows[None, :] * stride_hn + ks[:, None] * stride_hd,
                mask=k_mask[:, None] & row_mask[None, :],
                other=0.0,
            )  # [BLOCK_K, BLOCK_N]
            h = h.to(w.dtype)
            if DOT_FP32:
                # Triton 3.9's interpreter multiplies bf16's uint16 storage as
                # integers in tl.dot (runtime/interpreter.py, create_dot); bf16
                # products are exact in fp32, so upcasting changes nothing else.
                w = w.to(tl.float32)
                h = h.to(tl.float32)
            # "ieee": fp32 inputs would otherwise run as TF32 on NVIDIA GPUs and
            # move the argmax away from the fp32 reference; bf16 is unaffected.
            acc = tl.dot(w, h, acc, input_precision="ieee")
        z = tl.where(v_mask[:, None], acc, float("-inf"))
        t1, ta = tl.max(z, axis=0, return_indices=True, return_indices_tie_break_left=True)
        t2 = tl.max(tl.where(offs_v[:, None] == ta[None, :], float("-inf"), z), axis=0)
        ts = tl.sum(tl.exp(z - t1[None, :]), axis=0)  # every tile has a finite t1
        new_m1 = tl.maximum(m1, t1)
        s = s * tl.exp(m1 - new_m1) + ts * tl.exp(t1 - new_m1)
        m2 = tl.maximum(tl.minimum(m1, t1), tl.maximum(m2, t2))
        a = tl.where(t1 > m1, v0 + ta, a)
        m1 = new_m1

    out = pid_s * n + rows
    tl.store(part_m1_ptr + out, m1, mask=row_mask)
    tl.store(part_m2_ptr + out, m2, mask=row_mask)
    tl.store(part_s_ptr + out, s, mask=row_mask)
    tl.store(part_a_ptr + out, a, mask=row_mask)


@triton.jit(do_not_specialize=["n", "num_splits"])
def _exit_confidence_reduce_kernel(
    part_m1_ptr,  # [S, n] fp32
    part_m2_ptr,  # [S, n] fp32
    part_s_ptr,  # [S, n] fp32
    part_a_ptr,  # [S, n] int32
    index_ptr,  # [K] int32 | int64 shortlist; None without HAS_INDEX
    threshold_ptr,  # [n] fp32
    confidence_ptr,  # [n] fp32 out
    argmax_ptr,  # [n] int64 out
    exit_mask_ptr,  # [n] uint8 out (a bool tensor viewed as bytes)
    n,
    num_splits,
    stride_i,
    MEASURE: tl.constexpr,  # 0: max_prob, 1: margin
    HAS_INDEX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < n
    offs_s = tl.arange(0, BLOCK_S)  # [BLOCK_S]

    m1 = tl.full([BLOCK_N], float("-inf"), tl.float32)
    m2 = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    a = tl.zeros([BLOCK_N], tl.int32)
    # Splits cover ascending vocabulary ranges, so the lowest split wins a tie.
    for s0 in range(0, num_splits, BLOCK_S):
        sp = s0 + offs_s
        sp_mask = sp < num_splits
        idx = sp[None, :] * n + rows[:, None]  # [BLOCK_N, BLOCK_S]
        mask = row_mask[:, None] & sp_mask[None, :]
        c_m1 = tl.load(part_m1_ptr + idx, mask=mask, other=0.0)
        c_m1 = tl.where(sp_mask[None, :], c_m1, float("-inf"))
        c_m2 = tl.load(part_m2_ptr + idx, mask=mask, other=float("-inf"))
        c_s = tl.load(part_s_ptr + idx, mask=mask, other=0.0)
        c_a = tl.load(part_a_ptr + idx, mask=mask, other=0)
        t1, j = tl.max(c_m1, axis=1, return_indices=True, return_indices_tie_break_left=True)
        is_j = offs_s[None, :] == j[:, None]
        ta = tl.sum(tl.where(is_j, c_a, 0), axis=1)
        t2 = tl.maximum(
            tl.max(tl.where(is_j, float("-inf"), c_m1), axis=1), tl.max(c_m2, axis=1)
        )
        ts = tl.sum(c_s * tl.exp(c_m1 - t1[:, None]), axis=1)
        new_m1 = tl.maximum(m1, t1)
        s = s * tl.exp(m1 - new_m1) + ts * tl.exp(t1 - new_m1)
        m2 = tl.maximum(tl.minimum(m1, t1), tl.maximum(m2, t2))
        a = tl.where(t1 > m1, ta, a)
        m1 = new_m1

    p1 = 1.0 / tl.where(row_mask, s, 1.0)  # s >= 1 on real rows
    if MEASURE == 0:
        confidence = p1
    else:
        confidence = p1 - tl.exp(m2 - m1) * p1
    if HAS_INDEX:
        # Position -> vocabulary id here rather than in the main kernel: one load per
        # row instead of one per split and row, and both kernels break ties in
        # position order (tiles and splits ascend in j), which is the order promised.
        token = tl.load(index_ptr + a * stride_i, mask=row_mask, other=0).to(tl.int64)
    else:
        token = a.to(tl.int64)
    threshold = tl.load(threshold_ptr + rows, mask=row_mask, other=float("inf"))
    tl.store(confidence_ptr + rows, confidence, mask=row_mask)
    tl.store(argmax_ptr + rows, token, mask=row_mask)
    tl.store(exit_mask_ptr + rows, (confidence >= threshold).to(tl.uint8), mask=row_mask)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _default_config(n: int, d: int, device: torch.device) -> dict:
    if device.type == "cpu":
        # The interpreter runs programs one after another in numpy: big tiles,
        # few iterations. A few splits still exercise the reduce kernel.
        return dict(block_n=max(16, min(256, triton.next_power_of_2(n))), block_v=512,
                    block_k=max(16, min(1024, triton.next_power_of_2(d))),
                    splits_per_sm=4, num_warps=4, num_stages=1)
    # GPU caps: one compile per cap, not per n. Small n streams the head
    # (memory-bound: deep pipeline); n > 64 approaches the MMA ridge.
    if n <= 16:
        return dict(block_n=16, block_v=128, block_k=128, splits_per_sm=2, num_warps=4, num_stages=4)
    if n <= 32:
        return dict(block_n=32, block_v=128, block_k=128, splits_per_sm=2, num_warps=4, num_stages=4)
    if n <= 64:
        return dict(block_n=64, block_v=128, block_k=64, splits_per_sm=2, num_warps=4, num_stages=4)
    return dict(block_n=128, block_v=128, block_k=64, splits_per_sm=1, num_warps=8, num_stages=3)


def _check_index(index: torch.Tensor, V: int, device: torch.device) -> None:
    """Shape, dtype and device only: the ids' range would need a host sync."""
    assert index.ndim == 1 and index.dtype in (torch.int32, torch.int64), (index.shape, index.dtype)
    assert 1 <= index.shape[0] <= V, f"shortlist of {index.shape[0]} rows for a vocabulary of {V}"
    assert index.device == device, (index.device, device)


def exit_confidence_triton(
    hidden: torch.Tensor,  # [n, d] fp32 | bf16 | fp16, final-normed ramp output
    weight: torch.Tensor,  # [V, d] LM head
    threshold: torch.Tensor,  # [n] fp32, +inf = never exit
    measure: str = "max_prob",
    index: torch.Tensor | None = None,  # [K] int32 | int64 shortlist of vocabulary ids
    **config,
) -> ExitConfidence:
    """Launch the fused kernels. `config` overrides the tile choice (benchmarks, tests):
    block_n, block_v, block_k, num_splits or splits_per_sm, num_warps, num_stages.
    With `index`, the tiles and splits are over its K positions (see the module doc)."""
    assert measure in MEASURES, f"measure must be one of {MEASURES}, got {measure!r}"
    assert hidden.ndim == 2 and weight.ndim == 2, (hidden.shape, weight.shape)
    n, d = hidden.shape
    V = weight.shape[0]
    assert weight.shape[1] == d, f"hidden [n, {d}] does not match weight {tuple(weight.shape)}"
    assert hidden.dtype in _FLOAT_DTYPES and weight.dtype in _FLOAT_DTYPES, (hidden.dtype, weight.dtype)
    assert threshold.shape == (n,) and threshold.dtype == torch.float32, (threshold.shape, threshold.dtype)
    assert hidden.device == weight.device == threshold.device
    assert V >= 1 and d >= 1
    if index is not None:
        _check_index(index, V, weight.device)
        V = index.shape[0]  # from here on: the rows walked
    threshold = threshold.contiguous()
    device = hidden.device
    confidence = torch.empty(n, dtype=torch.float32, device=device)
    argmax = torch.empty(n, dtype=torch.int64, device=device)
    exit_mask = torch.empty(n, dtype=torch.bool, device=device)
    if n == 0:
        return ExitConfidence(confidence, argmax, exit_mask)

    cfg = _default_config(n, d, device)
    cfg.update(config)
    block_n, block_v = cfg["block_n"], cfg["block_v"]
    num_row_tiles = triton.cdiv(n, block_n)
    num_tiles = triton.cdiv(V, block_v)
    # Enough splits to fill the machine; every split gets >= 1 tile (the kernel's
    # online merge relies on a finite tile maximum).
    want = cfg.get("num_splits") or max(1, cfg["splits_per_sm"] * _sm_count(device) // num_row_tiles)
    tiles_per_split = triton.cdiv(num_tiles, min(want, num_tiles))
    num_splits = triton.cdiv(num_tiles, tiles_per_split)

    part_m1 = torch.empty(num_splits, n, dtype=torch.float32, device=device)
    part_m2 = torch.empty_like(part_m1)
    part_s = torch.empty_like(part_m1)
    part_a = torch.empty(num_splits, n, dtype=torch.int32, device=device)
    stride_i = index.stride(0) if index is not None else 0
    # Row tiles vary fastest, so the programs sharing a vocabulary slice run
    # together and read the head from HBM once (the others hit L2).
    for_device(_exit_confidence_kernel, device)[(num_row_tiles, num_splits)](
        hidden, weight, index, part_m1, part_m2, part_s, part_a,
        n, d, V, tiles_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), stride_i,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=cfg["block_k"], HAS_INDEX=index is not None,
        DOT_FP32=device.type == "cpu",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    reduce_n = 32
    for_device(_exit_confidence_reduce_kernel, device)[(triton.cdiv(n, reduce_n),)](
        part_m1, part_m2, part_s, part_a, index, threshold, confidence, argmax,
        exit_mask.view(torch.uint8), n, num_splits, stride_i,
        MEASURE=MEASURES.index(measure), HAS_INDEX=index is not None, BLOCK_N=reduce_n, BLOCK_S=64,
        num_warps=4,
    )
    return ExitConfidence(confidence, argmax, exit_mask)


@dataclass
class ConfidencePartials:
    """Per-row statistics of one vocabulary range (the kernel's per-split partials,
    in torch): the top logit `m1`, the second `m2` (-inf for a range of one id), the
    sum `s` of exp(z - m1), and the top-1's vocabulary id `a`. An empty range is
    m1 = m2 = -inf, s = 0. Ranges merge as in the module docstring, so a vocabulary
    split across tensor-parallel ranks is just more splits (vllm_e3.models.parallel)."""
    m1: torch.Tensor  # [n] fp32
    m2: torch.Tensor  # [n] fp32
    s: torch.Tensor  # [n] fp32
    a: torch.Tensor  # [n] int64

    @classmethod
    def of_logits(cls, logits: torch.Tensor) -> "ConfidencePartials":
        """From materialised logits [n, V], in fp32; `a` indexes the V columns."""
        z = logits.float()  # [n, V]
        n, V = z.shape
        if V == 0:
            inf = torch.full((n,), float("-inf"))
            return cls(inf, inf.clone(), torch.zeros(n), torch.zeros(n, dtype=torch.long))
        m1, a = z.max(dim=-1)  # the first maximal index, like torch.argmax
        s = torch.sub(z, m1[:, None]).exp_().sum(dim=-1)
        m2 = z.topk(2, dim=-1, sorted=True).values[:, 1] if V >= 2 else torch.full_like(m1, float("-inf"))
        return cls(m1, m2, s, a)

    def pack(self) -> torch.Tensor:
        """[4, n] fp32, `a` included (exact below 2^24 ids), for one collective."""
        return torch.stack([self.m1, self.m2, self.s, self.a.float()])

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> "ConfidencePartials":
        """[S, 4, n] fp32 from `pack` -> partials of shape [S, n]."""
        return cls(packed[:, 0], packed[:, 1], packed[:, 2], packed[:, 3].long())


def merge_partials(
    p: ConfidencePartials,  # [S, n] each: splits in ascending vocabulary order
    threshold: torch.Tensor,  # [n] fp32
    measure: str = "max_prob",
) -> ExitConfidence:
    """Merge the splits (the lowest split wins a tie, as in the kernel) and apply the
    measure: p1 = 1 / S_total, margin p1 - exp(l2 - l1) * p1."""
    assert measure in MEASURES, f"measure must be one of {MEASURES}, got {measure!r}"
    t1, j = p.m1.max(dim=0)  # [n]: the first split holding the top logit
    a = p.a.gather(0, j[None])[0]
    if p.m1.shape[0] == 1:
        s, t2 = p.s[0], p.m2[0]
    else:
        w = torch.exp(p.m1 - t1[None])
        s = (p.s * w.nan_to_num_(0.0)).sum(dim=0)  # an empty split adds 0 * 0
        others = p.m1.scatter(0, j[None], float("-inf")).max(dim=0).values
        t2 = torch.maximum(others, p.m2.max(dim=0).values)
    confidence = s.reciprocal()  # p1 = 1 / sum exp(z - l1)
    if measure == "margin":
        confidence = confidence - torch.exp(t2 - t1) * confidence  # l2 == l1 on a tie
    return ExitConfidence(confidence, a, confidence >= threshold)


def confidence_from_logits(
    logits: torch.Tensor,  # [n, V] any float dtype
    threshold: torch.Tensor,  # [n] fp32
    measure: str = "max_prob",
) -> ExitConfidence:
    """The statistics above from materialised logits, in fp32 (the torch path's tail;
    also for callers that already have logits from a faster head GEMM)."""
    assert measure in MEASURES, f"measure must be one of {MEASURES}, got {measure!r}"
    assert logits.ndim == 2 and threshold.shape == (logits.shape[0],), (logits.shape, threshold.shape)
    p = ConfidencePartials.of_logits(logits)
    return merge_partials(ConfidencePartials(p.m1[None], p.m2[None], p.s[None], p.a[None]), threshold, measure)


def exit_confidence_torch(
    hidden: torch.Tensor,  # [n, d]
    weight: torch.Tensor,  # [V, d]
    threshold: torch.Tensor,  # [n] fp32
    measure: str = "max_prob",
    index: torch.Tensor | None = None,  # [K] int32 | int64 shortlist of vocabulary ids
) -> ExitConfidence:
    """The dispatcher's torch path: logits in the head's own dtype (never a per-call
    copy of the head), softmax statistics in fp32. bf16 logits (spacing 2^-8 relative)
    move probabilities by a few percent at |logit| ~ 10 and can swap near-tied top-1
    candidates, as vLLM's own bf16 logits would. A caller may pass a cached fp32 head
    (hidden is cast to the head's dtype): exact, and on CPUs without native bf16
    (AVX2) faster too; see benchmarks/RESULTS.md, "Kernels".

    With `index`, the logits come from the gathered rows weight[index] [K, d]. That is
    a per-call copy of K rows, but not of the head: the gather reads K rows and writes
    K, the GEMM reads them again, 3K/V of the full head's bytes (less than the full
    head while K < V/3, which is what a shortlist is for), and torch has no gathered
    GEMM that would avoid it. A caller that reuses one shortlist can cache
    weight[index] itself, pass it with index=None and map the argmax as index[argmax]."""
    if index is not None:
        _check_index(index, weight.shape[0], weight.device)
        weight = weight[index]  # [K, d]
    logits = hidden.to(weight.dtype) @ weight.T  # [n, V] or [n, K]
    res = confidence_from_logits(logits, threshold, measure)
    if index is not None:  # positions -> vocabulary ids (first position on ties)
        res.argmax = index[res.argmax].to(torch.int64)
    return res


def exit_confidence_ref(
    hidden: torch.Tensor,  # [n, d]
    weight: torch.Tensor,  # [V, d]
    threshold: torch.Tensor,  # [n] fp32
    measure: str = "max_prob",
    index: torch.Tensor | None = None,  # [K] int32 | int64 shortlist of vocabulary ids
) -> ExitConfidence:
    """Plain reference: fp32 logits, softmax, sort. Slow (copies the head to fp32).
    With `index`: the same over the rows weight[index], argmax mapped to index[a]."""
    assert measure in MEASURES, measure
    if index is not None:
        weight = weight[index.long()]  # [K, d]
    logits = hidden.float() @ weight.float().T  # [n, V] or [n, K]
    probs = torch.softmax(logits, dim=-1)  # [n, V]
    top = probs.sort(dim=-1, descending=True).values  # [n, V]
    p1 = top[:, 0]
    p2 = top[:, 1] if top.shape[1] > 1 else torch.zeros_like(p1)
    confidence = p1 if measure == "max_prob" else p1 - p2
    argmax = torch.argmax(logits, dim=-1)
    if index is not None:
        argmax = index.long()[argmax]
    return ExitConfidence(confidence, argmax, confidence >= threshold)


# ---------------------------------------------------------------------------------------
# gate_confidence: conf = sigmoid(hidden @ gate_weight + gate_bias) (CALM's "classifier"
# measure). Reads n*d + d elements and writes 5 bytes per row; unfused torch writes and
# re-reads the [n] logit, bias sum and sigmoid (3 launches) and reads the bias on the host
# if one is careless. Here the bias stays a device tensor.
# ---------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n"])
def _gate_confidence_kernel(
    hidden_ptr,  # [n, d] any float dtype, any strides
    gate_weight_ptr,  # [d]
    gate_bias_ptr,  # [1]
    threshold_ptr,  # [n] fp32
    confidence_ptr,  # [n] fp32 out
    exit_mask_ptr,  # [n] uint8 out (a bool tensor viewed as bytes)
    n,
    d,
    stride_hn,
    stride_hd,
    stride_g,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < n
    offs = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + offs
        k_mask = ks < d
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        g = tl.load(gate_weight_ptr + ks * stride_g, mask=k_mask, other=0.0).to(tl.float32)
        acc += tl.sum(h * g[None, :], axis=1)
    z = acc + tl.load(gate_bias_ptr).to(tl.float32)
    confidence = 1.0 / (1.0 + tl.exp(-z))
    threshold = tl.load(threshold_ptr + rows, mask=row_mask, other=float("inf"))
    tl.store(confidence_ptr + rows, confidence, mask=row_mask)
    tl.store(exit_mask_ptr + rows, (confidence >= threshold).to(tl.uint8), mask=row_mask)


def _check_gate(hidden, gate_weight, gate_bias, threshold) -> torch.Tensor:
    assert hidden.ndim == 2, hidden.shape
    n, d = hidden.shape
    gate_weight = gate_weight.reshape(-1)  # the artifact stores [1, d]
    assert gate_weight.shape == (d,), f"gate_weight {tuple(gate_weight.shape)} != [{d}]"
    assert gate_bias.numel() == 1, f"gate_bias must hold 1 element, got {tuple(gate_bias.shape)}"
    assert threshold.shape == (n,) and threshold.dtype == torch.float32, (threshold.shape, threshold.dtype)
    assert hidden.device == gate_weight.device == gate_bias.device == threshold.device
    return gate_weight


def gate_confidence_triton(
    hidden: torch.Tensor,  # [n, d]
    gate_weight: torch.Tensor,  # [d] (or [1, d])
    gate_bias: torch.Tensor,  # [1]
    threshold: torch.Tensor,  # [n] fp32
) -> ExitConfidence:
    gate_weight = _check_gate(hidden, gate_weight, gate_bias, threshold)
    assert hidden.dtype in _FLOAT_DTYPES, hidden.dtype
    n, d = hidden.shape
    device = hidden.device
    confidence = torch.empty(n, dtype=torch.float32, device=device)
    exit_mask = torch.empty(n, dtype=torch.bool, device=device)
    if n == 0:
        return ExitConfidence(confidence, None, exit_mask)
    block_n = 16
    block_d = min(1024 if device.type == "cpu" else 512, triton.next_power_of_2(d))
    for_device(_gate_confidence_kernel, device)[(triton.cdiv(n, block_n),)](
        hidden, gate_weight, gate_bias, threshold.contiguous(), confidence, exit_mask.view(torch.uint8),
        n, d, hidden.stride(0), hidden.stride(1), gate_weight.stride(0),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    return ExitConfidence(confidence, None, exit_mask)


def gate_confidence_ref(
    hidden: torch.Tensor,  # [n, d]
    gate_weight: torch.Tensor,  # [d] (or [1, d])
    gate_bias: torch.Tensor,  # [1]
    threshold: torch.Tensor,  # [n] fp32
) -> ExitConfidence:
    """Reference and CPU path: fp32 dot product, sigmoid, compare (no host sync)."""
    gate_weight = _check_gate(hidden, gate_weight, gate_bias, threshold)
    confidence = torch.sigmoid(hidden.float() @ gate_weight.float() + gate_bias.float().reshape(1))
    return ExitConfidence(confidence, None, confidence >= threshold)
