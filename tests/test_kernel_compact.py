"""compact / scatter_rows: the Triton kernels (interpreted on CPU) against the torch
reference and literal expected tensors. TRITON_INTERPRET=1 must be set before triton
is imported (see test_kernel_exit_confidence.py)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_e3.kernels import Compacted, compact_ref, compact_triton, scatter_rows  # noqa: E402

FIELDS = ("num_keep", "keep_idx", "dest", "hidden", "residual", "positions")

# (n, d, dtype, mask kind, strided)
CASES = [
    (1, 64, torch.float32, "all", False),
    (1, 64, torch.bfloat16, "none", False),
    (7, 769, torch.bfloat16, "random", True),
    (83, 576, torch.float32, "none", True),
    (83, 64, torch.bfloat16, "all", False),
    (256, 576, torch.bfloat16, "random", False),
    (2500, 8, torch.float32, "random", True),  # more than one scan block (1024)
]


def _inputs(n, d, dtype, kind, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = {"all": torch.ones(n, dtype=torch.bool), "none": torch.zeros(n, dtype=torch.bool),
            "random": torch.rand(n, generator=g) < 0.6}[kind]
    if strided:  # column-slice views and every-other-element positions
        hidden = torch.randn(n, d + 7, generator=g).to(dtype)[:, 3 : 3 + d]
        residual = torch.randn(n, 2 * d, generator=g).to(dtype)[:, ::2]
        positions = torch.randint(0, 4096, (2 * n,), generator=g)[::2]
    else:
        hidden = torch.randn(n, d, generator=g).to(dtype)
        residual = torch.randn(n, d, generator=g).to(dtype)
        positions = torch.randint(0, 4096, (n,), generator=g)
    return keep, hidden, residual, positions


@pytest.mark.parametrize("n,d,dtype,kind,strided", CASES)
def test_compact_triton_matches_ref(n, d, dtype, kind, strided):
    keep, hidden, residual, positions = _inputs(n, d, dtype, kind, strided)
    got = compact_triton(keep, hidden, residual, positions)
    ref = compact_ref(keep, hidden, residual, positions)
    for field in FIELDS:  # a gather is exact: bitwise equality
        assert torch.equal(getattr(got, field), getattr(ref, field)), field
    assert got.num_keep.shape == (1,) and got.num_keep.dtype == torch.int64
    k = int(keep.sum())
    assert int(got.num_keep) == k
    assert torch.equal(got.hidden[:k], hidden[keep]) and torch.equal(got.positions[:k], positions[keep])
    assert torch.equal(got.hidden[k:], hidden[~keep])  # exiting rows follow, in order


def test_compact_literal():
    keep = torch.tensor([True, False, True, True, False])
    hidden = torch.arange(10.0).reshape(5, 2)
    positions = torch.tensor([10, 11, 12, 13, 14])
    for fn in (compact_triton, compact_ref):
        got = fn(keep, hidden, -hidden, positions)
        assert isinstance(got, Compacted)
        assert got.num_keep.tolist() == [3]
        assert got.keep_idx.tolist() == [0, 2, 3, 1, 4]
        assert got.dest.tolist() == [0, -1, 1, 2, -1]
        assert got.positions.tolist() == [10, 12, 13, 11, 14]
        assert got.hidden.tolist() == [[0, 1], [4, 5], [6, 7], [2, 3], [8, 9]]
        assert torch.equal(got.residual, -got.hidden)


def test_scatter_rows_inverts_the_gather():
    keep, hidden, residual, positions = _inputs(83, 64, torch.float32, "random", False)
    c = compact_triton(keep, hidden, residual, positions)
    k = int(c.num_keep)
    out = torch.zeros_like(hidden)
    assert scatter_rows(out, c.hidden[:k], c.keep_idx) is out
    assert torch.equal(out[keep], hidden[keep]) and not out[~keep].any()
    assert torch.equal(scatter_rows(torch.empty_like(hidden), c.hidden, c.keep_idx), hidden)
    # dest is the inverse map of keep_idx on the kept rows
    assert torch.equal(c.keep_idx[c.dest[keep]], torch.nonzero(keep).flatten())
