"""vllm-e3: early-exit LLM serving for vLLM with E3 regrouping.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it once in
every process (front end, engine core, workers, model-inspection
subprocesses); it is idempotent and lazy: it registers the E3 model classes by
"module:Class" strings and applies the patches in `vllm_e3.patches`, importing
neither torch-heavy model code nor the kernels.

`kernels/`, `patches/` and `artifacts/` sit at the repository top and are
installed as `vllm_e3.kernels`, `vllm_e3.patches` and `vllm_e3.artifacts`
(setup.py `package_dir`); the project imports them only by those names.
The design: docs/design.md.
"""
__version__ = "0.1.0"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from .models import E3_ARCHITECTURES
    from .patches import apply_all

    supported = set(ModelRegistry.get_supported_archs())
    for e3_cls in E3_ARCHITECTURES.values():
        if e3_cls not in supported:
            ModelRegistry.register_model(e3_cls, f"vllm_e3.models.e3_model:{e3_cls}")
    apply_all()
    _registered = True
