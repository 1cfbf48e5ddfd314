"""One switch between the Triton kernels and their torch paths.

`VLLM_E3_KERNELS`, read once, when this module is imported (`set_backend`
changes the choice in a running process, for tests and benchmarks):
  auto    (default) Triton for CUDA tensors when Triton imports, torch otherwise
  torch   always the torch path
  triton  always Triton; CPU tensors then run through Triton's interpreter (exact,
          very slow: for tests, not for serving)
"""
from __future__ import annotations

import os

import torch

from ._triton import HAS_TRITON
from .compact import Compacted, compact_ref, compact_triton
from .exit_confidence import (
    ExitConfidence,
    exit_confidence_torch,
    exit_confidence_triton,
    gate_confidence_ref,
    gate_confidence_triton,
)

BACKENDS = ("auto", "torch", "triton")


def parse_backend(value: str) -> str:
    value = value.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"VLLM_E3_KERNELS={value!r}; expected one of {BACKENDS}")
    return value


_backend = parse_backend(os.environ.get("VLLM_E3_KERNELS", "auto"))   # the one read


def kernel_backend() -> str:
    """The kernel backend in use (`VLLM_E3_KERNELS` at import, or `set_backend`)."""
    return _backend


def set_backend(value: str) -> str:
    """Switch the backend; returns the previous one."""
    global _backend
    prev, _backend = _backend, parse_backend(value)
    return prev


def use_triton(device: torch.device) -> bool:
    """Whether a call on tensors on `device` runs the Triton kernels."""
    backend = kernel_backend()
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("VLLM_E3_KERNELS=triton but Triton is not installed")
        return True
    return backend == "auto" and HAS_TRITON and device.type == "cuda"


def exit_confidence(
    hidden: torch.Tensor,  # [n, d] final-normed ramp output
    weight: torch.Tensor,  # [V, d] shared LM head
    threshold: torch.Tensor,  # [n] fp32, +inf = never exit
    measure: str = "max_prob",  # "max_prob" | "margin"
    index: torch.Tensor | None = None,  # [K] int32 | int64 shortlist of vocabulary ids
) -> ExitConfidence:
    if use_triton(hidden.device):
        return exit_confidence_triton(hidden, weight, threshold, measure, index=index)
    return exit_confidence_torch(hidden, weight, threshold, measure, index=index)


def gate_confidence(
    hidden: torch.Tensor,  # [n, d]
    gate_weight: torch.Tensor,  # [d] (or [1, d])
    gate_bias: torch.Tensor,  # [1]
    threshold: torch.Tensor,  # [n] fp32
) -> ExitConfidence:
    if use_triton(hidden.device):
        return gate_confidence_triton(hidden, gate_weight, gate_bias, threshold)
    return gate_confidence_ref(hidden, gate_weight, gate_bias, threshold)


def compact(
    keep: torch.Tensor,  # [n] bool, True = continues past this exit
    hidden: torch.Tensor,  # [n, d]
    residual: torch.Tensor,  # [n, d]
    positions: torch.Tensor,  # [n] int64
) -> Compacted:
    if use_triton(hidden.device):
        return compact_triton(keep, hidden, residual, positions)
    return compact_ref(keep, hidden, residual, positions)
