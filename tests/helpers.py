"""Shared prompts and engine helpers for the tests."""
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
