"""vllm_e3.models.parallel.VocabShard across two real processes (torch.distributed,
gloo): each holds half of an LM head as vLLM's ParallelLMHead lays it out
(rows of ids [start, end), zero padding rows after them) and the decision
they reach -- confidence, argmax, exit mask -- is the unsharded head's, for
max_prob, margin and a shortlist split unevenly between the ranks (one rank
holding none of it is included). The engine-level TP test is
test_tensor_parallel.py."""
import os
import tempfile
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_e3.kernels import exit_confidence_ref

V, D, N, PAD = 1000, 32, 9, 12            # 500 ids per rank, each shard padded by 12 rows


class Gloo:
    """The one collective VocabShard uses, on a torch.distributed group."""

    def all_gather(self, x, dim=0):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=dim)


def _inputs():
    g = torch.Generator().manual_seed(0)
    head = torch.randn(V, D, generator=g)
    hidden = torch.randn(N, D, generator=g) * 2
    hidden[3] = 0.0                                    # a row of ties
    return head, hidden, torch.full((N,), 0.05)


SHORTLISTS = {"even": [7, 900, 3, 620, 499, 500, 11], "one rank": [1, 2, 3, 4, 5]}


def _rank(rank, path):
    from vllm_e3.models.parallel import VocabShard

    dist.init_process_group("gloo", init_method=f"file://{path}.init", rank=rank, world_size=2)
    head, hidden, thr = _inputs()
    lo, hi = rank * V // 2, (rank + 1) * V // 2
    weight = torch.cat([head[lo:hi], torch.zeros(PAD, D)])
    lm_head = SimpleNamespace(weight=weight, shard_indices=SimpleNamespace(org_vocab_start_index=lo,
                                                                             num_org_elements=hi - lo))
    out = {}
    for measure in ("max_prob", "margin"):
        r = VocabShard.of(lm_head, None, Gloo()).confidence(hidden, thr, measure)
        out[measure] = (r.confidence, r.argmax, r.exit_mask)
    for name, ids in SHORTLISTS.items():
        r = VocabShard.of(lm_head, torch.tensor(ids), Gloo()).confidence(hidden, thr, "max_prob")
        out[name] = (r.confidence, r.argmax, r.exit_mask)
    torch.save(out, f"{path}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_decide_as_the_whole_head():
    path = os.path.join(tempfile.mkdtemp(), "vs")
    mp.start_processes(_rank, args=(path,), nprocs=2, start_method="spawn")
    got = [torch.load(f"{path}.{r}") for r in range(2)]
    head, hidden, thr = _inputs()
    want = {m: exit_confidence_ref(hidden, head, thr, m) for m in ("max_prob", "margin")}
    want.update({name: exit_confidence_ref(hidden, head, thr, "max_prob", index=torch.tensor(ids))
                 for name, ids in SHORTLISTS.items()})
    for key, ref in want.items():
        for rank in range(2):
            conf, argmax, mask = got[rank][key]
            torch.testing.assert_close(conf, ref.confidence, atol=1e-6, rtol=1e-5)
            assert torch.equal(argmax, ref.argmax), (key, rank)
            assert torch.equal(mask, ref.exit_mask), (key, rank)
        assert all(torch.equal(a, b) for a, b in zip(got[0][key], got[1][key])), key   # bit for bit
    assert got[0]["max_prob"][1][3] == 0                  # the tied row: the lowest id
