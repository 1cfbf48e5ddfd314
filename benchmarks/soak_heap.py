"""Where the soak's worker RSS goes: rounds of soak-like requests (the
soak's prompt/length/knob mix, offline) in one process (engine core and
worker inline), printing after each round the RSS, glibc's bytes in use and
free in its heap (mallinfo2), then the RSS after malloc_trim(0).

    .venv/bin/python benchmarks/soak_heap.py e3 4 200       # policy e3, shipped ramps
    .venv/bin/python benchmarks/soak_heap.py vanilla 4 200

RSS before the trim minus after it is freed heap glibc kept; growth after
the trim, or of the bytes in use, would be a leak.
"""
import ctypes, gc, json, os, random, sys, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = MI2

def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

def tensors():
    import torch
    n = b = 0
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and not o.is_meta:
                n += 1; b += o.untyped_storage().nbytes()
        except Exception: pass
    return n, b / 2**20

def main():
    impl = sys.argv[1]; rounds = int(sys.argv[2]); per = int(sys.argv[3])
    from vllm import LLM, SamplingParams
    from vllm_e3.prepare import default_model_dir, deploy_artifact, model_view

    model = model_view(default_model_dir(), default_model_dir().rstrip(os.sep) + "-deployed")
    deploy_artifact(model, replace=True)
    kw = dict(dtype="float32", enforce_eager=True, max_num_seqs=64, max_model_len=1280, seed=0)
    if impl == "e3":
        kw.update(model_impl="e3", max_num_active_seqs=32, additional_config={"e3": {"policy": "e3"}})
    llm = LLM(model, **kw)
    tok = llm.get_tokenizer()
    rng = random.Random(0)
    words = "river lamp stone quiet market winter engine garden letter window number silver forest question answer morning paper bridge island machine".split()
    for r in range(rounds):
        prompts, sps = [], []
        for i in range(per):
            x = rng.random()
            plen = rng.randint(8, 128) if x < 0.8 else rng.randint(128, 512) if x < 0.97 else rng.randint(512, 1024)
            ids = tok(" ".join(rng.choice(words) for _ in range(plen)))["input_ids"][:plen]
            mt = rng.choice([1, 2, 4, 8, 16, 32, 64, 128])
            if rng.random() < 0.003: mt = 1280 - len(ids)
            knob = rng.choice([None, {"e3_enabled": 0}, {"e3_enabled": 1}, {"e3_target_agreement": 0.95}, {"e3_target_agreement": 0.99}])
            prompts.append({"prompt_token_ids": ids})
            sps.append(SamplingParams(max_tokens=mt, temperature=0, ignore_eos=False, extra_args=knob if impl == "e3" else None))
        t = time.time()
        llm.generate(prompts, sps, use_tqdm=False)
        gc.collect()
        m = libc.mallinfo2()
        a = rss()
        n, b = tensors()
        libc.malloc_trim(0)
        print(json.dumps({"impl": impl, "round": r, "s": round(time.time() - t, 1), "rss_mb": round(a), "after_trim_mb": round(rss()),
                          "malloc_inuse_mb": round(m.uordblks / 2**20), "malloc_free_mb": round(m.fordblks / 2**20),
                          "mmap_mb": round(m.hblkhd / 2**20), "tensors": n, "tensor_mb": round(b)}), flush=True)

if __name__ == "__main__":
    main()
