"""vllm_e3.kernels: fused exit-decision and compaction kernels (torch + Triton only).

Glossary
  exit point   a ramp reads the state after decoder layer e-1; tokens may stop there.
  ramp output  `hidden` [n, d]: a row already final-normed, i.e. what the LM head reads.
  confidence   per-row score that the ramp's top-1 is the full model's: max softmax
               probability, top-1/top-2 probability margin, or a learned gate.
  threshold    per-row fp32; a row exits when confidence >= threshold (+inf: never).
  keep mask    [n] bool, rows that do NOT exit and continue to the next stage.
  compaction   stable partition of rows by the keep mask: continuing rows first. (The
               compiled stages partition inside their own graph, vllm_e3/models/stage.py;
               this kernel serves callers outside a graph.)
  shortlist    optional `index` [K] of vocabulary ids: max_prob / margin over those
               K head rows only (argmax reported as a vocabulary id).

Ops (one name across kernel, test and benchmark):
  exit_confidence(hidden, weight, threshold, measure, index=None)  kernels/exit_confidence.py
  gate_confidence(hidden, gate_weight, gate_bias, threshold)
  compact(keep, hidden, residual, positions)                       kernels/compact.py
Each has `<op>_ref` (torch reference) and `<op>_triton` (launcher); `dispatch.py`
picks between them (`VLLM_E3_KERNELS` = auto | torch | triton).
"""
from ._triton import HAS_TRITON
from .compact import Compacted, compact_ref, compact_triton, scatter_rows
from .dispatch import compact, exit_confidence, gate_confidence, kernel_backend, use_triton
from .exit_confidence import (
    MEASURES,
    ConfidencePartials,
    ExitConfidence,
    confidence_from_logits,
    exit_confidence_ref,
    exit_confidence_torch,
    exit_confidence_triton,
    gate_confidence_ref,
    gate_confidence_triton,
    merge_partials,
)

__all__ = [
    "HAS_TRITON", "MEASURES", "Compacted", "ConfidencePartials", "ExitConfidence",
    "compact", "compact_ref", "compact_triton", "scatter_rows",
    "exit_confidence", "exit_confidence_ref", "exit_confidence_torch", "exit_confidence_triton",
    "confidence_from_logits", "gate_confidence", "gate_confidence_ref", "gate_confidence_triton",
    "kernel_backend", "merge_partials", "use_triton",
]
