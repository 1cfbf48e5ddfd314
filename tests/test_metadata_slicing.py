"""Slicing attention metadata for the rows that continue: literal expected
values, and the shared per-layer object is never mutated."""
import types

import pytest
import torch


@pytest.fixture()
def md_and_layer():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata, _get_attn_isa

    # 4 requests: decode (row 0), decode (row 1), prefill of 4 (rows 2-5), decode (row 6)
    md = CPUAttentionMetadata(
        num_actual_tokens=7, max_query_len=4,
        query_start_loc=torch.tensor([0, 1, 2, 6, 7], dtype=torch.int32),
        max_seq_len=12, seq_lens=torch.tensor([5, 9, 4, 12], dtype=torch.int32),
        block_table=torch.arange(12, dtype=torch.int32).view(4, 3),
        slot_mapping=torch.tensor([40, 73, 96, 97, 98, 99, 139]),
        scheduler_metadata=None)
    dtype, block, head = torch.float32, 32, 64
    impl = types.SimpleNamespace(num_heads=9, num_kv_heads=3, head_size=head, sliding_window=-1,
                                 kv_cache_dtype="auto")
    layer = types.SimpleNamespace(impl=impl, kv_cache=torch.zeros(1, dtype=dtype),
                                  isa=_get_attn_isa(dtype, block, head, "auto"))
    return md, layer


def test_slice_is_exact_and_leaves_the_original(md_and_layer):
    from vllm_e3.exits import slice_attn_metadata

    md, layer = md_and_layer
    before = {k: v.clone() for k, v in vars(md).items() if isinstance(v, torch.Tensor)}
    # request 1 (row 1) and request 3 (row 6) exited
    new = slice_attn_metadata(md, layer, torch.tensor([0, 2, 3, 4, 5]), torch.tensor([0, 2]))
    assert new is not md
    assert new.num_actual_tokens == 5 and new.max_query_len == 4 and new.max_seq_len == 5
    assert new.query_start_loc.tolist() == [0, 1, 5]
    assert new.seq_lens.tolist() == [5, 4]
    assert new.block_table.tolist() == [[0, 1, 2], [6, 7, 8]]
    assert new.slot_mapping.tolist() == [40, 96, 97, 98, 99]
    assert new.scheduler_metadata is not None
    for k, v in before.items():
        assert torch.equal(getattr(md, k), v), k
    assert md.num_actual_tokens == 7 and md.scheduler_metadata is None


def test_attention_view_replaces_entries_and_restores(md_and_layer):
    from vllm_e3.exits import AttentionView

    md, layer = md_and_layer
    slots = {"l0": md.slot_mapping, "l1": md.slot_mapping}
    shared = {"l0": md, "l1": md}          # every layer points at one object
    fc = types.SimpleNamespace(attn_metadata=shared, slot_mapping=slots)
    view = AttentionView(fc, {"l0": layer, "l1": layer})
    view.restrict(torch.tensor([1, 6]), torch.tensor([1, 3]))
    assert fc.attn_metadata is not shared
    assert fc.attn_metadata["l0"] is fc.attn_metadata["l1"]          # sliced once, shared
    assert fc.attn_metadata["l0"].query_start_loc.tolist() == [0, 1, 2]
    assert fc.slot_mapping["l1"].tolist() == [73, 139]
    assert shared["l0"] is md and md.num_actual_tokens == 7
    view.restore()
    assert fc.attn_metadata is shared and fc.slot_mapping is slots
