"""Shared prompts and engine helpers for the tests."""
import contextlib
import gc

# Prompts of varied length (3..~60 tokens) for greedy comparisons.
PROMPTS = [
    "What is the capital of France?",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Write a haiku about autumn leaves.",
    "import numpy as np\nimport torch\n\ndef softmax(x):",
    "Q: What is 12 times 7?\nA:",
    "List five fruits that are red:",
    "The quick brown fox",
    "Explain in one sentence why the sky is blue.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "Translate to French: Good morning, how are you?",
    "In 1969, the first humans",
    "Hello",
    "A recipe for pancakes needs flour, eggs, milk and",
    "The mitochondria is the powerhouse of the cell. Photosynthesis happens in the chloroplast. "
    "Cellular respiration releases energy from glucose, and the process",
]


# The exits and synthetic profile most engine tests run: 30% of decode tokens
# leave at 8, 25% at 15, 20% at 22 (0.357 of those reaching 15, 0.444 of those
# reaching 22).
EXITS = [8, 15, 22]
MIDDLE = {8: 0.3, 15: 0.357, 22: 0.444}
MAX_TOKENS = 24          # tokens per prompt in the comparisons with the reference
# The E3 config of the session's shared eager engine (conftest.shared_e3).
SHARED_E3 = {"policy": "e3", "exits": EXITS, "force_exit": MIDDLE, "target_batch": 12, "max_park_steps": 3,
             "park_when": "always", "test_overrides": True}


def overrides(**fields) -> dict:
    """SamplingParams.extra_args carrying vllm-e3's test-only overrides
    (policy, force_exit, kv_fill, park_when: vllm_e3.knobs); the engine must
    be started with the E3 config key `test_overrides: true`."""
    return {"_e3_test": fields}


def free_engine(llm) -> None:
    """Shut an engine down so the next one in the process gets the memory."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def kernel_inputs(n, d, V, dtype, strided, seed=0):
    """Ramp outputs [n, d] and an LM head [V, d] for the kernel tests, and the
    generator that made them; `strided`: a column-slice view of hidden and a
    transposed view of the head."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if strided:
        hidden = torch.randn(n, d + 13, generator=g).to(dtype)[:, 5 : 5 + d]
        weight = (torch.randn(d, V, generator=g) * 0.15).to(dtype).T
        assert hidden.stride(0) == d + 13 and weight.stride(0) == 1
    else:
        hidden = torch.randn(n, d, generator=g).to(dtype)
        weight = (torch.randn(V, d, generator=g) * 0.15).to(dtype)
    return hidden, weight, g


def tiny_llama(path, *, layers: int = 8, hidden: int = 128, vocab: int = 512, tie: bool = False,
               seed: int = 0, dtype: str = "float32") -> str:
    """A random Llama saved as a HF dir at `path`: 4 attention heads and 2 KV
    heads (TP = 2 divides them; hidden 128 gives vLLM's CPU attention a head
    size of 32), float32. A wide init (0.25) makes its distributions peaked,
    so greedy outputs vary and top-1 means something. `dtype`: what the
    config declares and the weights are saved in."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=tie, initializer_range=0.25,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=dtype)
    LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(path)
    return str(path)


def tiny_prompt_ids(n: int, vocab: int = 512, seed: int = 0, lo: int = 2, hi: int = 6) -> list[list[int]]:
    """`n` random prompts of lo..hi-1 token ids in [3, vocab)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def plant_ramps(model_dir: str, exits, rank: int = 8, scale: float = 0.1, seed: int = 1) -> str:
    """Random low-rank ramps at `exits` in `<model_dir>/e3/ramps.safetensors`
    (the format `vllm-e3 train` writes, tied to this model's weights)."""
    import os

    import torch
    from transformers import AutoConfig

    from vllm_e3.ramps import model_hash, ramp_key, save_ramps

    d = AutoConfig.from_pretrained(model_dir).hidden_size
    g = torch.Generator().manual_seed(seed)
    t = {}
    for e in exits:
        t[ramp_key(e, "norm.weight")] = torch.ones(d)
        t[ramp_key(e, "down.weight")] = torch.randn(rank, d, generator=g) * scale
        t[ramp_key(e, "up.weight")] = torch.randn(d, rank, generator=g) * scale
    path = os.path.join(model_dir, "e3", "ramps.safetensors")
    save_ramps(path, t, exits=list(exits), base_model_hash=model_hash(model_dir), recipe={"planted": seed},
               data_hash="planted")
    return path


class CachedReference:
    """The plain-PyTorch E3 reference (vllm_e3.tools.reference.ReferenceE3,
    float32) with each (prompt, settings) generated once, and the top-2 logit
    margin of the reference at a given step."""

    def __init__(self, model_dir, max_tokens: int, ramps=None):
        import torch

        from vllm_e3.tools.reference import ReferenceE3

        self.impl = ReferenceE3(model_dir, dtype=torch.float32, ramps=ramps)
        self.max_tokens = max_tokens
        self.cache = {}

    @classmethod
    def with_ramps_of(cls, model_dir, max_tokens: int) -> "CachedReference":
        """The reference with the ramps in `<model_dir>/e3/ramps.safetensors`."""
        import os

        import torch
        from transformers import AutoConfig

        from vllm_e3.tools.calibrate import load_ramps

        cfg = AutoConfig.from_pretrained(model_dir)
        ramps, _ = load_ramps(os.path.join(model_dir, "e3", "ramps.safetensors"), cfg.hidden_size,
                              cfg.rms_norm_eps)
        torch.set_num_threads(1)
        return cls(model_dir, max_tokens, ramps)

    def _run(self, ids, kw):
        key = (tuple(ids), repr(sorted(kw.items())))
        if key not in self.cache:
            out = self.impl.generate(ids, self.max_tokens, **kw)
            self.cache[key] = (out, list(self.impl.audits))
        return self.cache[key]

    def generate(self, ids, **kw):
        """(tokens, the exit each left at or None)."""
        return self._run(ids, kw)[0]

    def audits(self, ids, **kw) -> list[tuple[int, bool]]:
        return self._run(ids, kw)[1]

    def margin(self, ids, step: int, **kw) -> float:
        """Top-1 minus top-2 logit of the reference's token `step` (0-based).
        With a forced profile the head runs once per token, so the head's
        calls in order are the tokens' logits."""
        logits = []
        hook = self.impl.model.lm_head.register_forward_hook(
            lambda m, i, o: logits.append(o.reshape(-1, o.shape[-1])[-1].float()))
        try:
            self.impl.generate(ids, step + 1, **kw)
        finally:
            hook.remove()
        top = logits[step].topk(2).values
        return float(top[0] - top[1])


def assert_same_ids(what: str, got: list, want: list, prompt_ids: list, ref: CachedReference,
                    margin: float, names: list | None = None, **kw) -> None:
    """Each prompt's ids in `got` equal `want`. Inductor fuses a stage's ops
    differently from eager PyTorch, so a divergence passes only where the
    reference's top-2 logit margin at the first differing step is below
    `margin` (computed and printed, not assumed)."""
    diverged = []
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            step = next(j for j, (a, b) in enumerate(zip(g, w)) if a != b)
            diverged.append(((names or prompt_ids)[i], step, ref.margin(prompt_ids[i], step, **kw)))
    for name, step, m in diverged:
        print(f"{what}: {str(name)[:30]!r} first differs at token {step}, reference top-2 margin {m:.3g}")
    assert len(got) == len(want) and all(m < margin for _, _, m in diverged), diverged


@contextlib.contextmanager
def one_core_per_rank():
    """VLLM_CPU_OMP_THREADS_BIND="0|1" while engines of two ranks start (on
    this 2-core machine `auto` wants a NUMA node per rank); restored after."""
    import os

    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
