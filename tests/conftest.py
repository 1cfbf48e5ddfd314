"""Shared fixtures: the prepared embedded model, and engine settings for this
2-core machine. Engines take ~25 s to start: modules share one per case."""
import gc
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this once, at its first import (vLLM imports it too): the
# kernel tests run the Triton kernels on the CPU through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

@pytest.fixture(scope="session")
def model_dir():
    from vllm_e3.prepare import default_model_dir, _manifest_ok

    d = default_model_dir()
    if not _manifest_ok(d):
        from vllm_e3.prepare import prepare

        prepare(d)
    return d
