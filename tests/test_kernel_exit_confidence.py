"""exit_confidence / gate_confidence: Triton (interpreted on CPU) and torch paths
against the plain torch references, hand-made ties and literal expected values.

A representative sample, not the full product, keeps the suite to ~1-2 minutes on
2 cores under TRITON_INTERPRET=1 (which must be set before triton is imported;
vLLM imports triton too, so a suite that imports vLLM first needs it in conftest).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import kernel_inputs  # noqa: E402

from vllm_e3.kernels import (  # noqa: E402
    MEASURES,
    ConfidencePartials,
    confidence_from_logits,
    exit_confidence,
    exit_confidence_ref,
    exit_confidence_torch,
    exit_confidence_triton,
    gate_confidence,
    gate_confidence_ref,
    gate_confidence_triton,
    kernel_backend,
    merge_partials,
)
from vllm_e3.kernels import dispatch  # noqa: E402

# Probabilities from fp32-accumulated logits; bf16 inputs are exact in fp32, so only
# the summation order differs from the reference, and a little more with bf16's
# larger logits on a GPU's MMA order.
ATOL = {torch.float32: 3e-5, torch.bfloat16: 1e-4}

# (n, d, V, dtype, measure, mask kind, strided, tile overrides)
CASES = [
    (1, 64, 1000, torch.float32, "max_prob", "random", False, {}),
    (7, 769, 5003, torch.bfloat16, "margin", "none", True, {}),
    (83, 576, 5003, torch.bfloat16, "max_prob", "random", False, {}),
    (83, 64, 1000, torch.float32, "margin", "all", True, {}),
    (256, 576, 49152, torch.bfloat16, "max_prob", "random", False, {}),
    (7, 769, 50257, torch.float32, "margin", "random", True, {}),
    # GPU-like small tiles: many row tiles, vocabulary tiles, K steps and splits.
    (256, 64, 1000, torch.float32, "margin", "random", False,
     dict(block_n=16, block_v=128, block_k=16, num_splits=3)),
    (1, 576, 1000, torch.bfloat16, "max_prob", "random", True,
     dict(block_n=16, block_v=64, block_k=128, num_splits=5)),
]


def _thresholds(kind, n, g):
    if kind == "all":
        return torch.full((n,), -math.inf)
    if kind == "none":
        return torch.full((n,), math.inf)
    return torch.rand(n, generator=g) * 0.6


def _ref_logits(hidden, weight):
    return hidden.float() @ weight.float().T


def _assert_matches(got, ref, logits, threshold, atol):
    torch.testing.assert_close(got.confidence, ref.confidence, atol=atol, rtol=0)
    # argmax: equal, or a near-tie within the accumulation error of the logits.
    picked = logits.gather(1, got.argmax[:, None]).squeeze(1)
    assert (logits.max(dim=1).values - picked <= 1e-4).all()
    assert (got.argmax == ref.argmax).float().mean() >= 0.98
    # exit mask: equal wherever the confidence is not within tolerance of the threshold.
    decided = (ref.confidence - threshold).abs() > atol
    assert torch.equal(got.exit_mask[decided], ref.exit_mask[decided])


@pytest.mark.parametrize("n,d,V,dtype,measure,mask_kind,strided,config", CASES)
def test_exit_confidence_triton_matches_ref(n, d, V, dtype, measure, mask_kind, strided, config):
    hidden, weight, g = kernel_inputs(n, d, V, dtype, strided)
    threshold = _thresholds(mask_kind, n, g)
    got = exit_confidence_triton(hidden, weight, threshold, measure, **config)
    ref = exit_confidence_ref(hidden, weight, threshold, measure)
    assert got.confidence.dtype == torch.float32 and got.argmax.dtype == torch.int64
    assert got.exit_mask.dtype == torch.bool and got.confidence.shape == (n,)
    _assert_matches(got, ref, _ref_logits(hidden, weight), threshold, ATOL[dtype])
    if mask_kind == "all":
        assert got.exit_mask.all()
    if mask_kind == "none":
        assert not got.exit_mask.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("measure", MEASURES)
def test_exit_confidence_torch_path(dtype, measure):
    hidden, weight, g = kernel_inputs(83, 576, 5003, dtype, strided=False)
    threshold = torch.rand(83, generator=g) * 0.6
    got = exit_confidence_torch(hidden, weight, threshold, measure)
    # The torch path rounds logits to the head's dtype, then is exact in fp32:
    # compare with the reference statistics of those very logits ...
    logits = hidden @ weight.T
    probs = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True).values
    expect = probs[:, 0] if measure == "max_prob" else probs[:, 0] - probs[:, 1]
    torch.testing.assert_close(got.confidence, expect, atol=1e-6, rtol=1e-5)
    assert torch.equal(got.argmax, torch.argmax(logits, dim=-1))
    # ... and, loosely, with the fp32 reference: bf16 logits (spacing 2^-8 relative)
    # move probabilities by a few percent at |logit| ~ 10.
    ref = exit_confidence_ref(hidden, weight, threshold, measure)
    loose = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got.confidence, ref.confidence, atol=loose, rtol=0)


def test_literal_tiny_case():
    # logits row 0: [ln3, 0, -ln3, 0] -> p = [9, 3, 1, 3] / 16
    # row 1: all zero -> p = 1/4 each, argmax 0 (tie), margin 0
    # row 2: [0, 2, 0, 0] -> p1 = e^2 / (e^2 + 3), p2 = 1 / (e^2 + 3)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])
    hidden = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 2.0]])
    threshold = torch.tensor([0.5, 0.25, 0.75])
    e2 = math.exp(2.0)
    expect = {
        "max_prob": ([9 / 16, 1 / 4, e2 / (e2 + 3)], [True, True, False]),
        "margin": ([6 / 16, 0.0, (e2 - 1) / (e2 + 3)], [False, False, False]),
    }
    for measure, (conf, mask) in expect.items():
        for fn in (exit_confidence_triton, exit_confidence_torch, exit_confidence_ref):
            got = fn(hidden, weight, threshold, measure)
            torch.testing.assert_close(got.confidence, torch.tensor(conf), atol=1e-6, rtol=0)
            assert got.argmax.tolist() == [0, 0, 1], fn.__name__
            assert got.exit_mask.tolist() == mask, (fn.__name__, measure)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_at_the_maximum(dtype):
    # Small integers: every logit is exact in any summation order and in bf16, so the
    # maxima tie exactly. Tied rows 1234/1240 share a vocabulary tile; 4000 and 4999
    # sit in later tiles and later splits (block_v=512, 4 splits on 10 tiles), and
    # with 79 splits in later chunks of the reduce kernel's split loop (64 a chunk).
    n, d, V = 7, 64, 5003
    g = torch.Generator().manual_seed(1)
    hidden = torch.randint(-2, 3, (n, d), generator=g).float()
    weight = torch.randint(-1, 2, (V, d), generator=g).float() / 4
    top = hidden[0].sign() / 2  # z = sum |h| / 2: larger than any random row's
    for v in (4999, 4000, 1240, 1234):
        weight[v] = top
    hidden[1] = hidden[0]
    hidden[2] = 0.0  # every logit 0: argmax 0, probability 1 / V
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    threshold = torch.zeros(n)
    logits = _ref_logits(hidden, weight)
    assert (logits[0] == logits[0].max()).nonzero().flatten().tolist() == [1234, 1240, 4000, 4999]
    for measure in MEASURES:
        ref = exit_confidence_ref(hidden, weight, threshold, measure)
        for got in (
            exit_confidence_triton(hidden, weight, threshold, measure, block_v=512, num_splits=4),
            exit_confidence_triton(hidden, weight, threshold, measure, block_v=32, num_splits=100),
            exit_confidence_torch(hidden, weight, threshold, measure),
        ):
            assert got.argmax[:3].tolist() == [1234, 1234, 0]
            assert torch.equal(got.argmax, torch.argmax(logits, dim=-1))
            torch.testing.assert_close(got.confidence, ref.confidence, atol=1e-6, rtol=1e-5)
            if measure == "margin":  # p1 == p2 on a tie
                assert got.confidence[:3].tolist() == [0.0, 0.0, 0.0]
            else:
                torch.testing.assert_close(got.confidence[2], torch.tensor(1 / V), atol=1e-9, rtol=1e-5)


def test_confidence_from_logits_vocab_of_one():
    got = confidence_from_logits(torch.tensor([[3.0], [-1.0]]), torch.tensor([1.0, math.inf]), "margin")
    assert got.confidence.tolist() == [1.0, 1.0] and got.exit_mask.tolist() == [True, False]


@pytest.mark.parametrize("cuts", [[0, 5003], [0, 2501, 5003], [0, 1240, 1240, 4000, 5003], [0, 1, 4999, 5003]])
def test_partials_of_vocabulary_ranges_merge_to_the_whole(cuts):
    """What a tensor-parallel rank contributes (vllm_e3.models.parallel): the partial
    statistics of its vocabulary range, merged in rank order, equal the whole
    vocabulary's confidence and argmax -- ties at the maximum across ranges
    (1234/1240/4000/4999 as above), an empty range, a range of one id."""
    n, d, V = 7, 64, 5003
    g = torch.Generator().manual_seed(1)
    hidden = torch.randint(-2, 3, (n, d), generator=g).float()
    weight = torch.randint(-1, 2, (V, d), generator=g).float() / 4
    for v in (4999, 4000, 1240, 1234):
        weight[v] = hidden[0].sign() / 2
    hidden[2] = 0.0
    threshold = torch.full((n,), 0.3)
    logits = hidden @ weight.T
    parts = []
    for lo, hi in zip(cuts, cuts[1:]):
        p = ConfidencePartials.of_logits(logits[:, lo:hi])
        p.a = p.a + lo                                   # local column -> vocabulary id
        parts.append(p.pack())
    merged = ConfidencePartials.unpack(torch.stack(parts))
    for measure in MEASURES:
        ref = exit_confidence_ref(hidden, weight, threshold, measure)
        got = merge_partials(merged, threshold, measure)
        assert torch.equal(got.argmax, ref.argmax) and got.argmax[0] == 1234
        torch.testing.assert_close(got.confidence, ref.confidence, atol=1e-6, rtol=1e-5)
        assert torch.equal(got.exit_mask, got.confidence >= threshold)
        if measure == "margin":                          # the tie spans ranges: p1 == p2
            assert got.confidence[0] == 0.0


# (n, d, dtype, strided, weight as [1, d])
GATE_CASES = [
    (1, 64, torch.float32, False, False),
    (83, 769, torch.bfloat16, True, True),
    (256, 576, torch.bfloat16, False, False),
]


@pytest.mark.parametrize("n,d,dtype,strided,row_weight", GATE_CASES)
def test_gate_confidence_triton_matches_ref(n, d, dtype, strided, row_weight):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(n, d + 3 if strided else d, generator=g).to(dtype)[:, :d]
    gate_weight = (torch.randn(1, d, generator=g) * 0.05).to(dtype)
    gate_weight = gate_weight if row_weight else gate_weight[0]
    gate_bias = torch.tensor([0.25]).to(dtype)
    threshold = torch.rand(n, generator=g)
    got = gate_confidence_triton(hidden, gate_weight, gate_bias, threshold)
    ref = gate_confidence_ref(hidden, gate_weight, gate_bias, threshold)
    assert got.argmax is None and got.confidence.dtype == torch.float32
    torch.testing.assert_close(got.confidence, ref.confidence, atol=1e-6, rtol=1e-5)
    decided = (ref.confidence - threshold).abs() > 1e-5
    assert torch.equal(got.exit_mask[decided], ref.exit_mask[decided])


def test_gate_literal():
    # z = [2, -2, 0] -> sigmoid = [0.8808, 0.1192, 0.5]; 0.5 >= 0.5 exits.
    hidden = torch.tensor([[2.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    gate_weight, gate_bias = torch.tensor([1.0, -0.5]), torch.tensor([0.0])
    threshold = torch.tensor([0.5, 0.5, 0.5])
    expect = torch.tensor([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2)), 0.5])
    for fn in (gate_confidence_triton, gate_confidence_ref):
        got = fn(hidden, gate_weight, gate_bias, threshold)
        torch.testing.assert_close(got.confidence, expect, atol=1e-7, rtol=0)
        assert got.exit_mask.tolist() == [True, False, True]
    never = gate_confidence_triton(hidden, gate_weight, gate_bias, torch.full((3,), math.inf))
    assert not never.exit_mask.any()


def test_dispatcher_switch(monkeypatch):
    calls = []
    for name in ("exit_confidence_torch", "exit_confidence_triton", "gate_confidence_ref",
                 "gate_confidence_triton", "compact_ref", "compact_triton"):
        monkeypatch.setattr(dispatch, name, lambda *a, _n=name, **k: calls.append(_n) or _n)
    x, w, t = torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2)
    keep, pos = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.int64)

    def run_all():
        calls.clear()
        exit_confidence(x, w, t)
        gate_confidence(x, w[0], t[:1], t)
        dispatch.compact(keep, x, x, pos)
        return list(calls)

    monkeypatch.setattr(dispatch, "_backend", dispatch.parse_backend(""))
    assert kernel_backend() == "auto"
    assert run_all() == ["exit_confidence_torch", "gate_confidence_ref", "compact_ref"]  # CPU
    dispatch.set_backend("torch")
    assert run_all() == ["exit_confidence_torch", "gate_confidence_ref", "compact_ref"]
    dispatch.set_backend("Triton")
    assert kernel_backend() == "triton"
    assert run_all() == ["exit_confidence_triton", "gate_confidence_triton", "compact_triton"]
    with pytest.raises(ValueError, match="VLLM_E3_KERNELS"):
        dispatch.set_backend("cuda")
    assert kernel_backend() == "triton"                 # a bad value changes nothing


def test_the_backend_is_read_once_at_import():
    import subprocess
    import sys

    code = ("import os; from vllm_e3.kernels import dispatch; os.environ['VLLM_E3_KERNELS'] = 'triton'; "
            "print(dispatch.kernel_backend())")
    env = {**os.environ, "VLLM_E3_KERNELS": "torch"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "torch"
    env["VLLM_E3_KERNELS"] = "cuda"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "VLLM_E3_KERNELS='cuda'" in bad.stderr


def test_dispatcher_triton_on_cpu_runs_the_kernel(monkeypatch):
    hidden, weight, g = kernel_inputs(7, 64, 1000, torch.float32, strided=False)
    threshold = torch.rand(7, generator=g) * 0.2
    monkeypatch.setattr(dispatch, "_backend", "triton")
    got = exit_confidence(hidden, weight, threshold, "margin")
    ref = exit_confidence_ref(hidden, weight, threshold, "margin")
    _assert_matches(got, ref, _ref_logits(hidden, weight), threshold, ATOL[torch.float32])
