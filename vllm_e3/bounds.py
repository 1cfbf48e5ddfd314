"""Exact binomial bounds: the calibration's verify test (vllm_e3.tools.selection) and
the online audit's live agreement on /metrics (vllm_e3.metrics) use the same
one-sided Clopper-Pearson bound."""
from __future__ import annotations

import math

ALPHA = 0.05


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    import torch

    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = torch.arange(k + 1, dtype=torch.float64)
    logt = (math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p))
    return float(torch.logsumexp(logt, 0).exp())


def cp_upper(k: int, n: int, alpha: float = ALPHA) -> float:
    """One-sided Clopper-Pearson upper confidence bound (level 1 - alpha) on a
    binomial rate after k events in n trials: the p with P(X <= k; n, p) = alpha."""
    if n <= 0 or k >= n:
        return 1.0
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if binom_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi
