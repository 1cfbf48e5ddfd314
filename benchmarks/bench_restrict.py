"""Cost of restricting attention to the continuing requests: through the
attention group's own builder (vllm_e3.models.attention: gather the common
metadata, CPUAttentionMetadataBuilder.build) against the CPU-specific
slicing it replaced (dataclasses.replace on CPUAttentionMetadata plus the
kernel's work split). 64 decode requests, every other one kept; min and
median over 15 rounds of 2,000 calls.

    .venv/bin/python benchmarks/bench_restrict.py
"""
import time, dataclasses, torch, statistics
from vllm import _custom_ops as ops, envs
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder, _get_attn_isa
from vllm_e3.models.attention import select_requests
R=64
qsl=torch.arange(R+1,dtype=torch.int32); seq=torch.randint(64,200,(R,),dtype=torch.int32)
cm=CommonAttentionMetadata(query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq, num_reqs=R, num_actual_tokens=R, max_query_len=1, max_seq_len=int(seq.max()), block_table_tensor=torch.arange(R*40,dtype=torch.int32).view(R,40), slot_mapping=torch.arange(R)*7, seq_lens_cpu_upper_bound=seq.clone(), positions=seq.long()-1, is_prefilling=torch.zeros(R,dtype=torch.bool))
b=CPUAttentionMetadataBuilder.__new__(CPUAttentionMetadataBuilder)
b.num_heads,b.num_kv_heads,b.head_dim,b.dtype=9,3,64,torch.float32
b.window_size,b.block_size,b.kv_cache_dtype=-1,32,"auto"; b.isa=_get_attn_isa(torch.float32,32,64,"auto"); b.is_cross_attention=b.is_encoder_only_attention=False
full=b.build(0,cm)
keep=torch.arange(0,R,2)
def via_builder(): return b.build(0, select_requests(cm, keep, keep))
def cpu_slice():
    md=full; q=md.query_start_loc; ql=q[1:]-q[:-1]; kl=ql[keep]; nq=torch.zeros(keep.numel()+1,dtype=q.dtype); torch.cumsum(kl,0,out=nq[1:]); sl=md.seq_lens[keep]
    sm=ops.cpu_attn_get_scheduler_metadata(num_reqs=sl.numel(),num_heads=9,num_kv_heads=3,head_dim=64,seq_lens=sl,dtype=torch.float32,query_start_loc=nq,causal=True,sliding_window_size=-1,isa=b.isa,enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,dynamic_causal=None,kv_cache_dtype="auto")
    return dataclasses.replace(md,num_actual_tokens=int(keep.numel()),max_query_len=int(kl.max()),query_start_loc=nq,seq_lens=sl,max_seq_len=int(sl.max()),block_table=md.block_table[keep],slot_mapping=md.slot_mapping[keep],scheduler_metadata=sm)
res={}
for rnd in range(15):
    for name,f in (("builder",via_builder),("cpu_slice",cpu_slice)):
        for _ in range(50): f()
        t=time.perf_counter()
        for _ in range(2000): f()
        res.setdefault(name,[]).append((time.perf_counter()-t)/2000*1e6)
for k,v in res.items(): print(k, "us per restriction (64 reqs -> 32): min", round(min(v),1), "median", round(statistics.median(v),1))
