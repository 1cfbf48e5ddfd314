"""Restricting attention to the requests that continue, through the
attention group's own metadata builder (vllm_e3.models.attention): literal expected
values, equal to what the CPU-specific slicing computed before (but for the
maxima, which stay the step's upper bounds so that no host read is needed),
the shared objects are never mutated, and a decode-only step restricts
without a host read."""
import types

import pytest
import torch


@pytest.fixture()
def cm():
    from vllm.v1.attention.backend import CommonAttentionMetadata

    # 4 requests: decode (row 0), decode (row 1), prefill of 4 (rows 2-5), decode (row 6)
    qsl = torch.tensor([0, 1, 2, 6, 7], dtype=torch.int32)
    seq = torch.tensor([5, 9, 4, 12], dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq, num_reqs=4,
        num_actual_tokens=7, max_query_len=4, max_seq_len=12,
        block_table_tensor=torch.arange(12, dtype=torch.int32).view(4, 3),
        slot_mapping=torch.tensor([40, 73, 96, 97, 98, 99, 139]),
        seq_lens_cpu_upper_bound=seq.clone(), positions=torch.tensor([4, 8, 0, 1, 2, 3, 11]),
        is_prefilling=torch.tensor([False, False, True, False]))


@pytest.fixture()
def builder():
    """vLLM's CPU builder for a group of 9 query / 3 KV heads of 64, float32,
    32-token blocks (its constructor reads the layers from a live config;
    the fields it sets are set here)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder, _get_attn_isa

    b = CPUAttentionMetadataBuilder.__new__(CPUAttentionMetadataBuilder)
    b.num_heads, b.num_kv_heads, b.head_dim, b.dtype = 9, 3, 64, torch.float32
    b.window_size, b.block_size, b.kv_cache_dtype = -1, 32, "auto"
    b.isa = _get_attn_isa(torch.float32, 32, 64, "auto")
    b.is_cross_attention = b.is_encoder_only_attention = False
    return b


def test_select_requests_gathers_every_indexed_field(cm):
    from vllm_e3.models.attention import select_requests

    before = {k: v.clone() for k, v in vars(cm).items() if isinstance(v, torch.Tensor)}
    # request 1 (row 1) and request 3 (row 6) exited
    sub = select_requests(cm, torch.tensor([0, 2]), torch.tensor([0, 2, 3, 4, 5]))
    assert sub.num_reqs == 2 and sub.num_actual_tokens == 5 and sub.max_query_len == 4
    assert sub.max_seq_len == 12                 # the step's: an upper bound
    assert sub.query_start_loc.tolist() == [0, 1, 5] and sub.query_start_loc_cpu.tolist() == [0, 1, 5]
    assert sub.seq_lens.tolist() == [5, 4] and sub.seq_lens_cpu_upper_bound.tolist() == [5, 4]
    assert sub.block_table_tensor.tolist() == [[0, 1, 2], [6, 7, 8]]
    assert sub.slot_mapping.tolist() == [40, 96, 97, 98, 99]
    assert sub.positions.tolist() == [4, 0, 1, 2, 3]
    assert sub.is_prefilling.tolist() == [False, True]
    for k, v in before.items():
        assert torch.equal(getattr(cm, k), v), k
    assert cm.num_reqs == 4 and cm.num_actual_tokens == 7


def test_builder_metadata_equals_the_cpu_slicing(cm, builder):
    """The group's builder on the selected requests gives what the
    CPU-specific slicing gave: the literal fields, and a work split of its
    own."""
    from vllm import _custom_ops as ops
    from vllm import envs

    from vllm_e3.models.attention import select_requests

    md = builder.build(0, select_requests(cm, torch.tensor([0, 2]), torch.tensor([0, 2, 3, 4, 5])))
    assert md.num_actual_tokens == 5 and md.max_query_len == 4 and md.max_seq_len == 12
    assert md.query_start_loc.tolist() == [0, 1, 5]
    assert md.seq_lens.tolist() == [5, 4]
    assert md.block_table.tolist() == [[0, 1, 2], [6, 7, 8]]
    assert md.slot_mapping.tolist() == [40, 96, 97, 98, 99]
    # the kernel's work split is rebuilt for the subset (an opaque buffer
    # that holds pointers, so compared by size, not bytes)
    want = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=2, num_heads=9, num_kv_heads=3, head_dim=64,
        seq_lens=torch.tensor([5, 4], dtype=torch.int32), dtype=torch.float32,
        query_start_loc=torch.tensor([0, 1, 5], dtype=torch.int32), causal=True,
        sliding_window_size=-1, isa=builder.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=None, kv_cache_dtype="auto")
    full = builder.build(0, cm)
    assert md.scheduler_metadata.shape == want.shape
    assert md.scheduler_metadata.data_ptr() != full.scheduler_metadata.data_ptr()


def test_attention_view_builds_per_group_and_restores(cm, builder):
    from vllm_e3.models.attention import AttentionView, StepAttention

    full = builder.build(0, cm)
    calls = []

    def build_metadata(common):
        calls.append(common.num_reqs)
        return builder.build(0, common)

    group = types.SimpleNamespace(layer_names=["l0", "l1"], build_metadata=build_metadata)
    shared = {"l0": full, "l1": full}          # every layer points at one object
    slots = {"l0": cm.slot_mapping, "l1": cm.slot_mapping}
    fc = types.SimpleNamespace(attn_metadata=shared, slot_mapping=slots)
    view = AttentionView(fc, StepAttention({0: cm}, [[group]]))
    view.restrict(torch.tensor([1, 6]), torch.tensor([1, 3]))
    assert calls == [2]                                             # one build per group
    assert fc.attn_metadata is not shared
    assert fc.attn_metadata["l0"] is fc.attn_metadata["l1"]
    assert fc.attn_metadata["l0"].query_start_loc.tolist() == [0, 1, 2]
    assert fc.attn_metadata["l0"].seq_lens.tolist() == [9, 12]
    assert fc.slot_mapping["l1"].tolist() == [73, 139]
    assert fc.slot_mapping["l0"] is fc.slot_mapping["l1"]           # one gather for the group's layers
    assert shared["l0"] is full and full.num_actual_tokens == 7
    view.restore()
    assert fc.attn_metadata is shared and fc.slot_mapping is slots


def test_kernel_block_tables_are_refused():
    from vllm_e3.models.attention import check_groups

    ok = types.SimpleNamespace(layer_names=["l0"], kernel_block_size=None)
    check_groups([[ok]])
    mapped = types.SimpleNamespace(layer_names=["l0"], kernel_block_size=16)
    with pytest.raises(NotImplementedError, match="kernel_block_size=16"):
        check_groups([[ok, mapped]])


def test_decode_only_restriction_reads_nothing_from_tensors():
    """Every query one token: query_start_loc is a cached 0..n, and no op
    whose result's value or shape depends on tensor data runs."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_e3.profile import count_host_reads
    from vllm_e3.models.attention import select_requests

    qsl = torch.arange(5, dtype=torch.int32)
    seq = torch.tensor([5, 9, 4, 12], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq, num_reqs=4,
        num_actual_tokens=4, max_query_len=1, max_seq_len=12,
        block_table_tensor=torch.arange(12, dtype=torch.int32).view(4, 3),
        slot_mapping=torch.tensor([40, 73, 96, 139]), seq_lens_cpu_upper_bound=seq,
        positions=torch.tensor([4, 8, 3, 11]), is_prefilling=torch.tensor([False] * 4))
    keep = torch.tensor([1, 3])
    with count_host_reads() as reads:
        sub = select_requests(cm, keep, keep)
    assert reads.count == 0, reads.ops
    assert sub.query_start_loc_cpu.tolist() == [0, 1, 2] and sub.seq_lens.tolist() == [9, 12]
    assert sub.slot_mapping.tolist() == [73, 139] and sub.num_reqs == 2
