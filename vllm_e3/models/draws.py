"""Hash draws: the synthetic exit profile (`force_exit`) and the online
audit's sample (`audit_rate`). Each draw depends only on what the forward
sees -- seed, exit, position, input token -- so every run and policy makes
the same decision, a reference reproduces it, and the stage loop computes
them before the forward (`vllm_e3.models.rows.ExitPlan`), as inputs the
compiled stages compare, not decisions they wait on.

The hash is elementwise tensor arithmetic on int64 (a 32-bit integer mixer
applied per field), so a step's draws for all its rows and exits are a few
vectorised ops with no host read: on a GPU they stay on the device. Every
intermediate stays below 2**63 (32-bit lanes, multiplications split into
16-bit halves), so no op relies on signed overflow.
"""
from __future__ import annotations

import functools
import hashlib

import torch

_M32 = 0xFFFFFFFF
_U32 = float(2**32)


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32), without leaving [0, 2**63)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """A 32-bit finaliser (xor-shift-multiply, "lowbias32" constants, C.
    Wellons' hash-prospector): every input bit flips each output bit with
    probability ~1/2. The same ops on a Python int or an int64 tensor."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=256)
def _exit_keys(seed: int | str, exits: tuple[int, ...]) -> tuple[int, ...]:
    """Per exit, the hash of (seed, exit): the draw's first round, on the host
    once per configuration."""
    key = int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:4], "big")
    return tuple(_mix32((e & _M32) ^ key) for e in exits)


def uniform(seed: int | str, exits: int | tuple[int, ...], positions: torch.Tensor,
            token_ids: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1) for tokens reaching an exit: one exit (an
    int) or several (a tuple, along the last dimension), broadcast against
    `positions` and `token_ids`. A token leaves under rate q when its draw
    is < q: rate 1 always, rate 0 never."""
    if isinstance(exits, int):
        h = _exit_keys(seed, (exits,))[0]
    else:
        h = torch.tensor(_exit_keys(seed, tuple(exits)), dtype=torch.int64, device=positions.device)
    h = _mix32(h ^ (positions.long() & _M32))
    h = _mix32(h ^ (token_ids.long() & _M32))
    return h.double() / _U32


def forced_exit_u(seed: int | str, e: int, position: int, token_id: int) -> float:
    """The synthetic profile's uniform draw for one token reaching exit `e`:
    `uniform`'s ops on Python ints (the reference's per-token path)."""
    h = _mix32(_exit_keys(seed, (e,))[0] ^ (position & _M32))
    return _mix32(h ^ (token_id & _M32)) / _U32


def audit_key(seed: int) -> str:
    """The audit draws under another key than the profile's."""
    return f"audit{seed}"


def audit_mask(seed: int, e: int, rate: float, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[n] bool: which tokens exiting at `e` the online audit checks (E3Config.audit_rate):
    the synthetic profile's draw under another key, so a reference can reproduce it."""
    return uniform(audit_key(seed), e, positions, token_ids) < rate
