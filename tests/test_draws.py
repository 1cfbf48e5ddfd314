"""The synthetic profile's and the audit's hash draws (vllm_e3.models.draws)
and how the step's plan folds them into effective thresholds
(vllm_e3.models.rows.ExitPlan). No engines."""
import math
from types import SimpleNamespace

import torch

from vllm_e3.knobs import RequestRules
from vllm_e3.models.draws import audit_mask, forced_exit_u, uniform
from vllm_e3.models.rows import ExitPlan, RowLayout


def test_draws_are_pinned_literal_values():
    """The profile is part of every recorded result: a change of the hash
    shows here first (values from the 32-bit mixer as written)."""
    assert forced_exit_u(0, 8, 5, 1234) == 0.5569398044608533
    assert [round(forced_exit_u(0, e, 100, 7), 12) for e in (8, 15, 22)] == \
        [round(float(uniform(0, (8, 15, 22), torch.tensor([[100]]), torch.tensor([[7]]))[0, j]), 12)
         for j in range(3)]


def test_vectorised_draws_equal_one_at_a_time_and_are_uniform():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 4096, (512, 1), generator=g)
    tok = torch.randint(0, 49152, (512, 1), generator=g)
    u = uniform(3, (8, 15, 22), pos, tok)
    assert u.shape == (512, 3) and u.dtype == torch.float64
    for i in range(0, 512, 37):
        for j, e in enumerate((8, 15, 22)):
            assert u[i, j].item() == forced_exit_u(3, e, int(pos[i]), int(tok[i]))
    many = uniform(0, 8, torch.arange(200_000), torch.full((200_000,), 11))
    assert 0.0 <= many.min() and many.max() < 1.0
    for q in (0.1, 0.3, 0.5, 0.9):           # 200k draws: the rate within 4 standard deviations
        assert abs((many < q).double().mean().item() - q) < 4 * math.sqrt(q * (1 - q) / 200_000)
    other = uniform(1, 8, torch.arange(200_000), torch.full((200_000,), 11))
    assert abs(torch.corrcoef(torch.stack([many, other]))[0, 1].item()) < 0.01   # seeds independent
    audit = audit_mask(0, 8, 0.5, torch.arange(1000), torch.full((1000,), 11))
    assert not torch.equal(audit, many[:1000] < 0.5)                           # its own key


def test_plan_folds_the_draws_into_thresholds():
    """Three requests: a decode row forced at 8 and 15, a decode row under a
    real threshold, and a 2-row prompt chunk; one padding row."""
    cfg = SimpleNamespace(exits=[8, 15, 22], seed=0, audit_rate=0.0)
    qsl = torch.tensor([0, 1, 2, 4], dtype=torch.int32)
    positions = torch.tensor([40, 41, 0, 1, 0])
    tokens = torch.tensor([501, 777, 1, 2, 0])
    layout = RowLayout.build(qsl, positions, torch.tensor([10, 10, 9]))
    rules = [RequestRules("token", force_exit={8: 0.5, 15: 1.0}),
             RequestRules("token", thresholds={15: 0.875}),
             RequestRules("token", force_exit={8: 1.0})]
    plan = ExitPlan.build(cfg, layout, 5, SimpleNamespace(rules=rules, refill=False), positions, tokens)
    inf = math.inf
    leave8 = forced_exit_u(0, 8, 40, 501) < 0.5
    want = [[-inf if leave8 else inf, -inf, inf],     # forced row: the draw at 8, rate 1 at 15
            [inf, 0.875, inf],                        # the threshold where it has one
            [inf, inf, inf], [inf, inf, inf]]         # prompt rows never exit
    assert plan.thr[:4].tolist() == want
    assert plan.thr[4].isnan().all()                  # padding
    assert plan.may_park.tolist() == [False] * 5 and not plan.parks_any
