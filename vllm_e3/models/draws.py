"""Hash draws: the synthetic exit profile (`force_exit`) and the online
audit's sample (`audit_rate`). Each draw depends only on what the forward
sees -- seed, exit, position, input token -- so every run and policy makes
the same decision, a reference reproduces it, and the stage loop computes
them on the host before the forward (`vllm_e3.models.rows.ExitPlan`), as
inputs the compiled stages compare, not decisions they wait on.
"""
from __future__ import annotations

import hashlib
import struct

import torch

_U64 = float(2**64)


def forced_exit_u(seed: int | str, e: int, position: int, token_id: int) -> float:
    """The synthetic profile's uniform draw for a token reaching exit `e`.

    First 8 bytes of sha256(f"{seed}:{e}:{position}:{token_id}"), big-endian,
    over 2**64.
    """
    digest = hashlib.sha256(f"{seed}:{e}:{position}:{token_id}".encode()).digest()
    return struct.unpack(">Q", digest[:8])[0] / _U64


def draw_mask(seed: int | str, e: int, rates: list[float], positions: list[int],
              token_ids: list[int]) -> list[bool]:
    """Which tokens leave at `e`, each under its own rate (host lists: the
    hash runs per token in Python; rates 0 and 1 need no hash)."""
    return [q >= 1.0 or (q > 0.0 and forced_exit_u(seed, e, p, t) < q)
            for q, p, t in zip(rates, positions, token_ids)]


def forced_exit_mask(seed: int | str, e: int, rate: torch.Tensor, positions: torch.Tensor,
                     token_ids: torch.Tensor) -> torch.Tensor:
    """[n] bool: which rows leave at `e`, each under its own rate [n]."""
    return torch.tensor(draw_mask(seed, e, rate.tolist(), positions.tolist(), token_ids.tolist()),
                        dtype=torch.bool)


def audit_key(seed: int) -> str:
    """The audit draws under another key than the profile's."""
    return f"audit{seed}"


def audit_mask(seed: int, e: int, rate: float, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[n] bool: which tokens exiting at `e` the online audit checks (E3Config.audit_rate):
    the synthetic profile's draw under another key, so a reference can reproduce it."""
    n = positions.numel()
    return forced_exit_mask(audit_key(seed), e, torch.full((n,), float(rate)), positions, token_ids)
