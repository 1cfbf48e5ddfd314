"""Triton import shim: the package imports (and tests collect) without Triton.

`HAS_TRITON` says whether Triton imported. Without it, `triton.jit` is a
decorator that returns the function unchanged and `tl.constexpr` exists so the
kernel signatures still evaluate; launching a kernel then fails loudly in the
launcher's assert.

`for_device(kernel, device)` returns the kernel to launch for tensors on `device`,
and fails clearly when CPU tensors meet a compiled kernel. Triton decides
compiled-or-interpreted for every `@triton.jit` function (its own `tl.zeros`
included) when it is first imported, from `TRITON_INTERPRET`; so to run these
kernels on CPU tensors, set `TRITON_INTERPRET=1` before anything imports triton
(vLLM does, at import).
"""
from __future__ import annotations

import types

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without Triton
    HAS_TRITON = False

    def _jit(fn=None, **kwargs):
        if fn is None:
            return lambda f: f
        return fn

    triton = types.SimpleNamespace(
        jit=_jit,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda x: 1 << max(0, (int(x) - 1).bit_length()),
    )
    tl = types.SimpleNamespace(constexpr=object)


def interpreting() -> bool:
    """Whether Triton was imported in interpreter mode (kernels run on CPU tensors)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def for_device(kernel, device: torch.device):
    """The launchable form of a `@triton.jit` kernel for tensors on `device`."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use VLLM_E3_KERNELS=torch")
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is "
            "first imported (vLLM imports it); or use VLLM_E3_KERNELS=torch"
        )
    return kernel


__all__ = ["HAS_TRITON", "triton", "tl", "for_device", "interpreting"]
