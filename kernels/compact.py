"""compact: gather the rows that continue past an exit point into dense buffers.

Math. With `keep` [n] bool (True = the row does NOT exit), an exclusive prefix sum
gives each continuing row its new index, and the exiting rows follow in order:

    num_keep   = sum(keep)
    dest[i]    = sum(keep[:i])                       if keep[i]   else -1
    order(i)   = dest[i] if keep[i] else num_keep + sum(~keep[:i])   (a stable partition)
    keep_idx[order(i)] = i
    out[j]     = src[keep_idx[j]]   for hidden, residual, positions

The first `num_keep` rows of every output are the continuing rows (what the next
stage runs); the rest are the exiting rows in their original order, so the same
buffers also hold the exited rows' pre-ramp state contiguously (what KV fill reads).
`keep_idx[:num_keep]` is the row map that slices attention metadata; `dest` is its
inverse; `scatter_rows` puts stage outputs back at their source rows.

Why fusion pays (bytes). The gather is pure traffic: 2 * n * d * elt for hidden and
for residual plus 16n for positions, and torch needs the same bytes, but through
~8 launches (cumsum, where, argsort, three index_selects, a sum, ...) whose fixed
cost dominates at decode sizes (n <= 256). Here: one single-program scan (n bytes in,
16n out) and one gather, no host sync (`num_keep` stays a device tensor), and no
recompile per n.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import for_device, tl, triton


@dataclass
class Compacted:
    num_keep: torch.Tensor  # [1] int64 on the device: continuing rows (no host sync)
    keep_idx: torch.Tensor  # [n] int64: source row of each output row (kept rows first)
    dest: torch.Tensor  # [n] int64: output row of each kept source row, -1 if it exits
    hidden: torch.Tensor  # [n, d] rows [:num_keep] continue, the rest exit
    residual: torch.Tensor  # [n, d] same order
    positions: torch.Tensor  # [n] int64, same order


@triton.jit(do_not_specialize=["n"])
def _compact_index_kernel(
    keep_ptr,  # [n] uint8 (the bool mask viewed as bytes)
    keep_idx_ptr,  # [n] int64 out
    dest_ptr,  # [n] int64 out
    num_keep_ptr,  # [1] int64 out
    n,
    BLOCK: tl.constexpr,
):
    # One program: n is a decode batch (<= a few thousand), so a blocked scan with a
    # carried offset beats a multi-launch decoupled scan on launch cost alone.
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], tl.int32)
    for b0 in range(0, n, BLOCK):
        total += (tl.load(keep_ptr + b0 + offs, mask=b0 + offs < n, other=0) != 0).to(tl.int32)
    num_keep = tl.sum(total, axis=0)

    kept_before = 0
    dropped_before = 0
    for b0 in range(0, n, BLOCK):
        rows = b0 + offs
        valid = rows < n
        k = (tl.load(keep_ptr + rows, mask=valid, other=0) != 0).to(tl.int32)
        x = tl.where(valid, 1 - k, 0)
        k_excl = tl.cumsum(k, axis=0) - k + kept_before
        x_excl = tl.cumsum(x, axis=0) - x + dropped_before
        order = tl.where(k == 1, k_excl, num_keep + x_excl)
        tl.store(dest_ptr + rows, tl.where(k == 1, k_excl, -1).to(tl.int64), mask=valid)
        tl.store(keep_idx_ptr + order, rows.to(tl.int64), mask=valid)
        kept_before += tl.sum(k, axis=0)
        dropped_before += tl.sum(x, axis=0)
    tl.store(num_keep_ptr, num_keep.to(tl.int64))


@triton.jit(do_not_specialize=["n"])
def _compact_gather_kernel(
    keep_idx_ptr,  # [n] int64
    hidden_ptr,  # [n, d]
    residual_ptr,  # [n, d]
    positions_ptr,  # [n] int64
    out_hidden_ptr,  # [n, d] contiguous
    out_residual_ptr,  # [n, d] contiguous
    out_positions_ptr,  # [n] int64
    n,
    d,
    stride_hn,
    stride_hd,
    stride_rn,
    stride_rd,
    stride_p,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output rows
    row_mask = rows < n
    src = tl.load(keep_idx_ptr + rows, mask=row_mask, other=0)  # [BLOCK_N]
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = row_mask[:, None] & (cols < d)[None, :]
    h = tl.load(hidden_ptr + src[:, None] * stride_hn + cols[None, :] * stride_hd, mask=mask)
    tl.store(out_hidden_ptr + rows[:, None] * d + cols[None, :], h, mask=mask)
    r = tl.load(residual_ptr + src[:, None] * stride_rn + cols[None, :] * stride_rd, mask=mask)
    tl.store(out_residual_ptr + rows[:, None] * d + cols[None, :], r, mask=mask)
    if pid_d == 0:
        p = tl.load(positions_ptr + src * stride_p, mask=row_mask)
        tl.store(out_positions_ptr + rows, p, mask=row_mask)


def _check(keep, hidden, residual, positions):
    assert keep.ndim == 1 and keep.dtype == torch.bool, (keep.shape, keep.dtype)
    n = keep.shape[0]
    assert hidden.ndim == 2 and hidden.shape[0] == n, (hidden.shape, n)
    assert residual.shape == hidden.shape and residual.dtype == hidden.dtype, (residual.shape, residual.dtype)
    assert positions.shape == (n,) and positions.dtype == torch.int64, (positions.shape, positions.dtype)
    assert keep.device == hidden.device == residual.device == positions.device


def compact_triton(
    keep: torch.Tensor,  # [n] bool, True = continues
    hidden: torch.Tensor,  # [n, d], any strides
    residual: torch.Tensor,  # [n, d], any strides
    positions: torch.Tensor,  # [n] int64
) -> Compacted:
    _check(keep, hidden, residual, positions)
    n, d = hidden.shape
    device = hidden.device
    keep_idx = torch.empty(n, dtype=torch.int64, device=device)
    dest = torch.empty(n, dtype=torch.int64, device=device)
    num_keep = torch.zeros(1, dtype=torch.int64, device=device)
    out_h = torch.empty(n, d, dtype=hidden.dtype, device=device)
    out_r = torch.empty(n, d, dtype=residual.dtype, device=device)
    out_p = torch.empty(n, dtype=torch.int64, device=device)
    if n == 0:
        return Compacted(num_keep, keep_idx, dest, out_h, out_r, out_p)
    for_device(_compact_index_kernel, device)[(1,)](
        keep.contiguous().view(torch.uint8), keep_idx, dest, num_keep, n, BLOCK=1024, num_warps=4,
    )
    block_n = 4 if device.type == "cuda" else 64
    block_d = min(triton.next_power_of_2(d), 1024 if device.type == "cuda" else 4096)
    for_device(_compact_gather_kernel, device)[(triton.cdiv(n, block_n), triton.cdiv(d, block_d))](
        keep_idx, hidden, residual, positions, out_h, out_r, out_p,
        n, d, hidden.stride(0), hidden.stride(1), residual.stride(0), residual.stride(1),
        positions.stride(0),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    return Compacted(num_keep, keep_idx, dest, out_h, out_r, out_p)


def compact_ref(
    keep: torch.Tensor,  # [n] bool, True = continues
    hidden: torch.Tensor,  # [n, d]
    residual: torch.Tensor,  # [n, d]
    positions: torch.Tensor,  # [n] int64
) -> Compacted:
    """Reference and CPU path: a stable partition with torch ops (no host sync)."""
    _check(keep, hidden, residual, positions)
    keep_i = keep.to(torch.int64)
    kept_before = torch.cumsum(keep_i, 0) - keep_i  # [n] exclusive prefix sum
    dest = torch.where(keep, kept_before, -1)
    keep_idx = torch.argsort((~keep).to(torch.int8), stable=True)  # kept rows first, in order
    return Compacted(
        num_keep=keep_i.sum().reshape(1),
        keep_idx=keep_idx,
        dest=dest,
        hidden=hidden.index_select(0, keep_idx),
        residual=residual.index_select(0, keep_idx),
        positions=positions.index_select(0, keep_idx),
    )


def scatter_rows(
    out: torch.Tensor,  # [n, d] written in place
    src: torch.Tensor,  # [m, d] the first m compacted rows
    keep_idx: torch.Tensor,  # [n] int64 from `compact`
) -> torch.Tensor:
    """Inverse of the gather: out[keep_idx[j]] = src[j] for j < m. Returns `out`."""
    assert src.ndim == out.ndim and src.shape[1:] == out.shape[1:], (src.shape, out.shape)
    assert keep_idx.ndim == 1 and keep_idx.shape[0] >= src.shape[0], (keep_idx.shape, src.shape)
    return out.index_copy_(0, keep_idx[: src.shape[0]], src.to(out.dtype))
