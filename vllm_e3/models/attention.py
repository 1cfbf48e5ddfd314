"""Attention restricted to a subset of a step's requests, through each
attention group's own metadata builder: the model never names a backend.

The runner (vllm_e3.worker) captures, per KV-cache group, the step's
`CommonAttentionMetadata` as vLLM hands it to the groups' builders
(patches/patch_attn_capture.py), and publishes it with the runner's
attention groups in the step context (`StepAttention`). When a stage runs on
a subset of the requests, `select_requests` gathers the subset's rows of the
common metadata (every request- and token-indexed field, after
`CommonAttentionMetadata.unpadded()`), and each attention group's own
builder builds that group's metadata from it, as vLLM's fast-prefill builder
does for its subset (v1/attention/backends/utils.py). Layers read their
metadata and slot mapping from the forward context on every call, compiled
or not, so swapping them between stage calls is honoured.

Per-builder state. The CPU builder keeps none: `build` is one C++ call
(`cpu_attn_get_scheduler_metadata`) and a dataclass. Builders that keep
state the metadata points into (FlashInfer's planned wrapper, FA3's
persistent scheduler buffer under full graphs, a group's kernel block table)
would be overwritten by a restricted build while the step's full metadata
still refers to it; they need builders of their own for E3 (docs/gpu.md).
Start-up refuses a group with a kernel block size (`check_groups`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepAttention:
    """The step's attention inputs as the runner built them."""
    common: dict[int, object]      # KV-cache group id -> CommonAttentionMetadata
    groups: list[list[object]]     # [kv group][attn group] -> vLLM AttentionGroup

    def first(self):
        return self.common[min(self.common)]


_ARANGE = torch.arange(1, dtype=torch.int32)


def _arange(n: int) -> torch.Tensor:
    """[n] int32 0..n-1, a view of one cached tensor (no op per call)."""
    global _ARANGE
    if _ARANGE.numel() < n:
        _ARANGE = torch.arange(max(n, 2 * _ARANGE.numel()), dtype=torch.int32)
    return _ARANGE[:n]


def _as(x: torch.Tensor, dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _on(x: torch.Tensor, device) -> torch.Tensor:
    """`x` on `device`, with no op where it is there already (CPU)."""
    return x if x.device == device else x.to(device)


def select_requests(cm, keep_reqs: torch.Tensor, keep_rows: torch.Tensor):
    """The common metadata of the requests `keep_reqs` (ascending indices)
    whose rows are `keep_rows` (ascending; every row of each kept request).
    A new object: `cm` is shared by every group's builder and never changed.

    No host read: counts are the index tensors' shapes, and the maxima are
    the full step's (`max_query_len`, `max_seq_len`: upper bounds, which the
    CPU backend does not read and kernels elsewhere take as launch bounds).
    A decode-only step (every query one token) restricts `query_start_loc`
    to a cached 0..n."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    keep_reqs, keep_rows = _as(keep_reqs, torch.long), _as(keep_rows, torch.long)
    n_reqs, n_rows = keep_reqs.shape[0], keep_rows.shape[0]
    if cm.max_query_len == 1:
        new_qsl = _as(_arange(n_reqs + 1), cm.query_start_loc_cpu.dtype)
    else:
        qsl_cpu = cm.query_start_loc_cpu
        new_qsl = torch.zeros(n_reqs + 1, dtype=qsl_cpu.dtype)
        torch.cumsum((qsl_cpu[1:] - qsl_cpu[:-1])[keep_reqs], 0, out=new_qsl[1:])
    dev = cm.seq_lens.device
    reqs_dev = _on(keep_reqs, dev)

    def per_req(x):
        if x is None:
            return None
        if isinstance(x, torch.Tensor):
            return x[reqs_dev if x.device == dev else keep_reqs]
        return x[keep_reqs.numpy()]              # numpy (encoder_seq_lens_cpu, req_idx)

    seq_lens = cm.seq_lens[reqs_dev]
    seq_lens_cpu = (seq_lens if cm.seq_lens_cpu_upper_bound is cm.seq_lens
                    else per_req(cm.seq_lens_cpu_upper_bound))
    doc_ranges = None
    if cm.mm_req_doc_ranges is not None:
        old = keep_reqs.tolist()
        doc_ranges = {i: cm.mm_req_doc_ranges[j] for i, j in enumerate(old) if j in cm.mm_req_doc_ranges}
    return CommonAttentionMetadata(
        query_start_loc=_on(new_qsl, cm.query_start_loc.device),
        query_start_loc_cpu=new_qsl,
        seq_lens=seq_lens,
        num_reqs=n_reqs,
        num_actual_tokens=n_rows,
        max_query_len=cm.max_query_len,
        max_seq_len=cm.max_seq_len,
        block_table_tensor=cm.block_table_tensor[reqs_dev],
        slot_mapping=cm.slot_mapping[_on(keep_rows, cm.slot_mapping.device)],
        causal=per_req(cm.causal) if isinstance(cm.causal, torch.Tensor) else cm.causal,
        encoder_seq_lens=per_req(cm.encoder_seq_lens),
        encoder_seq_lens_cpu=per_req(cm.encoder_seq_lens_cpu),
        dcp_local_seq_lens=per_req(cm.dcp_local_seq_lens),
        dcp_local_seq_lens_cpu_upper_bound=per_req(cm.dcp_local_seq_lens_cpu_upper_bound),
        positions=None if cm.positions is None else cm.positions[_on(keep_rows, cm.positions.device)],
        is_prefilling=per_req(cm.is_prefilling),
        seq_lens_cpu_upper_bound=seq_lens_cpu,
        req_idx=per_req(cm.req_idx),
        mm_req_doc_ranges=doc_ranges,
        rswa_prefix_lens=per_req(cm.rswa_prefix_lens),
        replayssm_decode_base_cpu=per_req(cm.replayssm_decode_base_cpu),
    )


def check_groups(attn_groups) -> None:
    """Refuse, at start-up, attention groups whose restricted build would
    overwrite state the step's full metadata points into."""
    for groups in attn_groups:
        for g in groups:
            if g.kernel_block_size is not None:
                raise NotImplementedError(
                    f"vllm-e3: attention group of {g.layer_names[:1]}... maps blocks to kernel blocks "
                    f"(kernel_block_size={g.kernel_block_size}) in a persistent table, which a "
                    "restricted build would overwrite; exits need builders of their own here "
                    "(docs/gpu.md, section 3)")


class AttentionView:
    """The forward context's per-layer attention metadata and slot mappings,
    restricted to the active rows. Installs new dicts (entries replaced,
    shared objects untouched) and restores the originals on `restore()`."""

    def __init__(self, fc, attn: StepAttention):
        self.fc = fc
        self.attn = attn
        self.orig_md = fc.attn_metadata              # layer name -> metadata
        self.orig_slots = fc.slot_mapping            # layer name -> [N] slots

    def restrict(self, keep_rows: torch.Tensor, keep_reqs: torch.Tensor) -> None:
        """Point every layer at the rows `keep_rows` (indices into the
        original rows) of the requests `keep_reqs`: one metadata build per
        attention group, one slot gather per KV-cache group (its layers share
        one slot-mapping tensor)."""
        new_md = dict(self.orig_md)
        for gid, cm in self.attn.common.items():
            sub = select_requests(cm, keep_reqs, keep_rows)
            for group in self.attn.groups[gid]:
                md = group.build_metadata(sub)
                for name in group.layer_names:
                    new_md[name] = md
        self.fc.attn_metadata = new_md
        gathered: dict[int, torch.Tensor] = {}
        slots = {}
        for name, table in self.orig_slots.items():
            sub = gathered.get(id(table))
            if sub is None:
                sub = gathered[id(table)] = table[keep_rows]
            slots[name] = sub
        self.fc.slot_mapping = slots

    def restore(self) -> None:
        self.fc.attn_metadata = self.orig_md
        self.fc.slot_mapping = self.orig_slots
