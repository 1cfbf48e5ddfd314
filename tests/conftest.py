"""Shared fixtures: the prepared embedded model, and engine settings for this
2-core machine. Engines take ~25 s to start: modules share one per case."""
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this once, at its first import (vLLM imports it too): the
# kernel tests run the Triton kernels on the CPU through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

@pytest.fixture(scope="session")
def prepared_model_dir():
    """The embedded model as `vllm-e3 prepare` builds it (whatever e3/ folder
    is deployed beside it is left as it is)."""
    from vllm_e3.prepare import _manifest_ok, default_model_dir, prepare

    d = default_model_dir()
    if not _manifest_ok(d):
        prepare(d, deploy=False)
    return d


@pytest.fixture(scope="session")
def model_dir(prepared_model_dir):
    """The prepared weights with no e3/ folder (a sibling view of symlinks):
    engines start from E3's defaults -- policy full, identity ramps, max_prob
    confidence -- and each test sets its own exits, independent of the
    shipped ramps `vllm-e3 prepare` deploys for `make serve`."""
    from vllm_e3.prepare import bare_view

    return bare_view(prepared_model_dir)


@pytest.fixture(scope="session")
def deployed_model_dir(prepared_model_dir):
    """The prepared weights with the shipped artifact installed into their own
    e3/ folder by the code `vllm-e3 prepare` runs (`deploy_artifact`): what
    `make serve` starts with. A sibling view, so a user's own e3/ beside the
    real model neither changes nor is changed by the tests."""
    from vllm_e3.prepare import deploy_artifact, model_view

    d = model_view(prepared_model_dir, prepared_model_dir.rstrip(os.sep) + "-deployed")
    deploy_artifact(d, replace=True)
    return d
