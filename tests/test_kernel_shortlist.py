"""exit_confidence with a shortlist (`index` [K] of vocabulary ids): Triton (interpreted
on CPU) and torch paths against the plain torch reference over weight[index], the
full-vocabulary result at K = V, ties inside the shortlist and literal values.

Interpreter time grows with n * K * d / tile sizes: the cases stay at V <= 5003 and
K <= 1000 so the file runs in well under a minute on 2 cores.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import kernel_inputs  # noqa: E402

from vllm_e3.kernels import (  # noqa: E402
    MEASURES,
    exit_confidence,
    exit_confidence_ref,
    exit_confidence_torch,
    exit_confidence_triton,
)

# As in test_kernel_exit_confidence.py: fp32 accumulation, only the order differs.
ATOL = {torch.float32: 3e-5, torch.bfloat16: 1e-4}
SMALL_TILES = dict(block_n=16, block_v=64, block_k=16, num_splits=3)  # GPU-like

# (n, d, V, K, dtype, measure, index order, index dtype, strided inputs, tile overrides)
CASES = [
    (1, 64, 1000, 1, torch.float32, "max_prob", "unsorted", torch.int64, False, {}),
    (7, 576, 5003, 37, torch.bfloat16, "margin", "unsorted", torch.int32, True, {}),
    (83, 576, 5003, 257, torch.bfloat16, "max_prob", "sorted", torch.int64, False, {}),
    (83, 64, 1000, 1000, torch.float32, "margin", "unsorted", torch.int32, True, {}),
    (7, 64, 5003, 1000, torch.float32, "max_prob", "view", torch.int64, False, SMALL_TILES),
    (83, 576, 1000, 257, torch.bfloat16, "margin", "unsorted", torch.int32, True, SMALL_TILES),
    (1, 576, 5003, 37, torch.float32, "margin", "sorted", torch.int32, False, SMALL_TILES),
    (7, 64, 1000, 1, torch.bfloat16, "margin", "view", torch.int32, True, SMALL_TILES),
]


def _index(V, K, order, dtype, g):
    perm = torch.randperm(V, generator=g)
    if order == "unsorted":
        index = perm[:K]
    elif order == "sorted":
        index = perm[:K].sort().values
    else:  # "view": every other entry of a longer permutation (stride 2), where it fits
        index = perm[: 2 * K : 2] if 2 * K <= V else perm[:K]
        assert K == 1 or 2 * K > V or index.stride(0) == 2
    return index.to(dtype)


def _assert_matches(got, ref, hidden, weight, index, threshold, atol):
    torch.testing.assert_close(got.confidence, ref.confidence, atol=atol, rtol=0)
    assert got.argmax.dtype == torch.int64 and torch.isin(got.argmax, index.long()).all()
    # argmax: equal, or a near-tie within the accumulation error of the logits.
    logits = hidden.float() @ weight.float().T  # [n, V]
    best = logits[:, index.long()].max(dim=1).values
    assert (best - logits.gather(1, got.argmax[:, None]).squeeze(1) <= 1e-4).all()
    assert (got.argmax == ref.argmax).float().mean() >= 0.98
    decided = (ref.confidence - threshold).abs() > atol
    assert torch.equal(got.exit_mask[decided], ref.exit_mask[decided])


@pytest.mark.parametrize("n,d,V,K,dtype,measure,order,index_dtype,strided,config", CASES)
def test_shortlist_matches_ref(n, d, V, K, dtype, measure, order, index_dtype, strided, config):
    hidden, weight, g = kernel_inputs(n, d, V, dtype, strided)
    index = _index(V, K, order, index_dtype, g)
    threshold = torch.rand(n, generator=g) * (1.0 if K < 40 else 0.3)
    ref = exit_confidence_ref(hidden, weight, threshold, measure, index=index)
    got = exit_confidence_triton(hidden, weight, threshold, measure, index=index, **config)
    assert got.confidence.shape == (n,) and got.exit_mask.dtype == torch.bool
    _assert_matches(got, ref, hidden, weight, index, threshold, ATOL[dtype])
    # The torch path rounds logits to the head's dtype (see test_kernel_exit_confidence).
    got = exit_confidence_torch(hidden, weight, threshold, measure, index=index)
    loose = ATOL[dtype] if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got.confidence, ref.confidence, atol=loose, rtol=0)
    assert got.argmax.dtype == torch.int64 and torch.isin(got.argmax, index.long()).all()
    if dtype == torch.float32:
        assert torch.equal(got.argmax, ref.argmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("measure", MEASURES)
def test_shortlist_torch_path_exact_on_its_logits(dtype, measure):
    hidden, weight, g = kernel_inputs(83, 576, 5003, dtype, strided=True)
    index = _index(5003, 257, "unsorted", torch.int32, g)
    threshold = torch.rand(83, generator=g) * 0.3
    got = exit_confidence_torch(hidden, weight, threshold, measure, index=index)
    logits = hidden @ weight[index.long()].T  # [n, K] in the head's dtype
    probs = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True).values
    expect = probs[:, 0] if measure == "max_prob" else probs[:, 0] - probs[:, 1]
    torch.testing.assert_close(got.confidence, expect, atol=1e-6, rtol=1e-5)
    assert torch.equal(got.argmax, index.long()[torch.argmax(logits, dim=-1)])


@pytest.mark.parametrize("index_kind", ["arange32", "arange64", "permutation"])
def test_full_shortlist_equals_full_vocabulary(index_kind):
    n, d, V = 7, 64, 1000
    hidden, weight, g = kernel_inputs(n, d, V, torch.float32, strided=False)
    threshold = torch.rand(n, generator=g) * 0.1
    index = {
        "arange32": torch.arange(V, dtype=torch.int32),
        "arange64": torch.arange(V),
        "permutation": torch.randperm(V, generator=g),
    }[index_kind]
    for measure in MEASURES:
        for config in ({}, SMALL_TILES):
            full = exit_confidence_triton(hidden, weight, threshold, measure, **config)
            got = exit_confidence_triton(hidden, weight, threshold, measure, index=index, **config)
            torch.testing.assert_close(got.confidence, full.confidence, atol=1e-6, rtol=0)
            assert torch.equal(got.argmax, full.argmax)
            assert torch.equal(got.exit_mask, full.exit_mask)
        full = exit_confidence_torch(hidden, weight, threshold, measure)
        got = exit_confidence_torch(hidden, weight, threshold, measure, index=index)
        torch.testing.assert_close(got.confidence, full.confidence, atol=1e-6, rtol=0)
        assert torch.equal(got.argmax, full.argmax)
        ref = exit_confidence_ref(hidden, weight, threshold, measure, index=index)
        assert torch.equal(ref.argmax, exit_confidence_ref(hidden, weight, threshold, measure).argmax)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_shortlist_of_one_literal(index_dtype):
    # One logit: p1 = 1; p2 = 0 (the reference's convention for a single column, and
    # confidence_from_logits' for V = 1), so margin = 1 as well.
    hidden, weight, _ = kernel_inputs(3, 64, 1000, torch.float32, strided=False)
    index = torch.tensor([617], dtype=index_dtype)
    threshold = torch.tensor([1.0, math.inf, 0.5])
    for measure in MEASURES:
        for fn, kw in ((exit_confidence_triton, {}), (exit_confidence_triton, SMALL_TILES),
                       (exit_confidence_torch, {}), (exit_confidence_ref, {})):
            got = fn(hidden, weight, threshold, measure, index=index, **kw)
            assert got.confidence.tolist() == [1.0, 1.0, 1.0], (fn.__name__, measure)
            assert got.argmax.tolist() == [617, 617, 617] and got.argmax.dtype == torch.int64
            assert got.exit_mask.tolist() == [True, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_inside_the_shortlist(dtype):
    # Small integers, so every logit is exact and the maxima tie exactly. Vocabulary
    # rows 4999, 1240, 1234, 4000 are equal and larger than any other; the unsorted
    # index puts them at positions 3, 5 (same tile), 700 and 900 (later tiles and
    # splits at block_v=64, 3 splits): the earliest position's id, 4999, wins, not
    # the lowest id. Sorted, the same shortlist reports the lowest id, 1234.
    n, d, V, K = 7, 64, 5003, 1000
    g = torch.Generator().manual_seed(1)
    hidden = torch.randint(-2, 3, (n, d), generator=g).float()
    weight = torch.randint(-1, 2, (V, d), generator=g).float() / 4
    top = hidden[0].sign() / 2  # z = sum |h| / 2: larger than any random row's
    tied = {3: 4999, 5: 1240, 700: 1234, 900: 4000}
    for v in tied.values():
        weight[v] = top
    hidden[1] = hidden[0]
    hidden[2] = 0.0  # every logit 0: argmax index[0], probability 1 / K
    others = torch.randperm(V, generator=g)
    others = others[~torch.isin(others, torch.tensor(list(tied.values())))][: K - len(tied)]
    index = torch.empty(K, dtype=torch.int64)
    pos = torch.tensor(list(tied))
    rest = torch.ones(K, dtype=torch.bool)
    rest[pos] = False
    index[pos] = torch.tensor(list(tied.values()))
    index[rest] = others
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    threshold = torch.zeros(n)
    logits = hidden.float() @ weight.float()[index].T  # [n, K]
    assert (logits[0] == logits[0].max()).nonzero().flatten().tolist() == [3, 5, 700, 900]
    for idx, expect in ((index, 4999), (index.sort().values, 1234)):
        for measure in MEASURES:
            ref = exit_confidence_ref(hidden, weight, threshold, measure, index=idx)
            for got in (
                exit_confidence_triton(hidden, weight, threshold, measure, index=idx, **SMALL_TILES),
                exit_confidence_triton(hidden, weight, threshold, measure, index=idx.int(),
                                       block_v=512, num_splits=2),
                exit_confidence_torch(hidden, weight, threshold, measure, index=idx),
            ):
                assert got.argmax[:3].tolist() == [expect, expect, idx[0].item()]
                assert torch.equal(got.argmax, ref.argmax)
                torch.testing.assert_close(got.confidence, ref.confidence, atol=1e-6, rtol=1e-5)
                if measure == "margin":  # p1 == p2 on a tie
                    assert got.confidence[:3].tolist() == [0.0, 0.0, 0.0]
                else:
                    torch.testing.assert_close(got.confidence[2], torch.tensor(1 / K), atol=1e-9, rtol=1e-5)


def test_shortlist_exit_mask_per_row_thresholds():
    # Thresholds straddle each row's own confidence by 1e-3: rows alternate exit /
    # stay; the last two rows get -inf (always exits) and +inf (never).
    n, d, V, K = 12, 64, 1000, 257
    hidden, weight, g = kernel_inputs(n, d, V, torch.float32, strided=False)
    index = _index(V, K, "unsorted", torch.int64, g)
    for measure in MEASURES:
        conf = exit_confidence_ref(hidden, weight, torch.zeros(n), measure, index=index).confidence
        threshold = conf + torch.tensor([-1e-3, 1e-3] * (n // 2))
        threshold[-2:] = torch.tensor([-math.inf, math.inf])
        expect = [True, False] * (n // 2 - 1) + [True, False]
        for got in (
            exit_confidence_triton(hidden, weight, threshold, measure, index=index),
            exit_confidence_triton(hidden, weight, threshold, measure, index=index, **SMALL_TILES),
            exit_confidence_torch(hidden, weight, threshold, measure, index=index),
            exit_confidence_ref(hidden, weight, threshold, measure, index=index),
        ):
            assert got.exit_mask.tolist() == expect, measure


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dispatcher_passes_the_index(monkeypatch, backend):
    hidden, weight, g = kernel_inputs(7, 64, 1000, torch.float32, strided=False)
    index = _index(1000, 37, "unsorted", torch.int32, g)
    threshold = torch.rand(7, generator=g)
    from vllm_e3.kernels import dispatch

    monkeypatch.setattr(dispatch, "_backend", dispatch.parse_backend(backend))
    got = exit_confidence(hidden, weight, threshold, "margin", index=index)
    ref = exit_confidence_ref(hidden, weight, threshold, "margin", index=index)
    _assert_matches(got, ref, hidden, weight, index, threshold, ATOL[torch.float32])
    assert torch.equal(got.argmax, ref.argmax)


def test_bad_index_is_refused():
    hidden, weight, _ = kernel_inputs(2, 64, 100, torch.float32, strided=False)
    threshold = torch.zeros(2)
    for bad in (torch.zeros(0, dtype=torch.int64), torch.arange(101), torch.zeros(2, 2, dtype=torch.int64),
                torch.zeros(3)):
        for fn in (exit_confidence_triton, exit_confidence_torch):
            with pytest.raises(AssertionError):
                fn(hidden, weight, threshold, "max_prob", index=bad)
