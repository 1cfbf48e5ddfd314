"""Shared fixtures: the prepared embedded model, engine settings for this
2-core machine, and the engines and references several modules share.

Engines take ~25 s to start eager and ~60-90 s more compiled, so an engine
that serves several modules is session-scoped, those modules run one after
another (`pytest_collection_modifyitems`), and the engine is shut down after
the last test that uses it (`pytest_runtest_teardown`), not at the end of
the session. Tests on a shared engine read per-request statistics, or the
engine's counters reset or differenced around their own requests; each
module still passes when run alone.

Markers: `slow` on every test that starts an engine (an `LLM`, a server, a
`vllm` or `vllm-e3` subprocess that loads a model); `make test-fast` runs the
rest.
"""
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this once, at its first import (vLLM imports it too): the
# kernel tests run the Triton kernels on the CPU through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Engines shared across modules, in the order their modules run; each module
# of a group runs next to the others, and the engine is freed after the last.
SHARED = ("shared_e3", "knobs_server")


@pytest.fixture(scope="session")
def prepared_model_dir():
    """The embedded model as `vllm-e3 prepare` builds it (whatever e3/ folder
    is deployed beside it is left as it is)."""
    from vllm_e3.prepare import _manifest_ok, default_model_dir, prepare

    d = default_model_dir()
    if not _manifest_ok(d):
        prepare(d, deploy=False)
    return d


@pytest.fixture(scope="session")
def model_dir(prepared_model_dir):
    """The prepared weights with no e3/ folder (a sibling view of symlinks):
    engines start from E3's defaults -- policy full, identity ramps, max_prob
    confidence -- and each test sets its own exits, independent of the
    shipped ramps `vllm-e3 prepare` deploys for `make serve`."""
    from vllm_e3.prepare import bare_view

    return bare_view(prepared_model_dir)


@pytest.fixture(scope="session")
def deployed_model_dir(prepared_model_dir):
    """The prepared weights with the shipped artifact installed into their own
    e3/ folder by the code `vllm-e3 prepare` runs (`deploy_artifact`): what
    `make serve` starts with. A sibling view, so a user's own e3/ beside the
    real model neither changes nor is changed by the tests."""
    from vllm_e3.prepare import deploy_artifact, model_view

    d = model_view(prepared_model_dir, prepared_model_dir.rstrip(os.sep) + "-deployed")
    deploy_artifact(d, replace=True)
    return d


# ---- engines and references shared across modules ---------------------------------------------
class Shared:
    """A session resource with an early release: `close()` runs its
    finaliser once, whether after its last user or at the session's end."""

    def __init__(self, value, close):
        self.value, self._close = value, close

    def close(self):
        close, self._close = self._close, None
        if close is not None:
            close()


_shared: dict[str, Shared] = {}


def _hold(name, value, close):
    _shared[name] = Shared(value, close)
    return _shared[name]


@pytest.fixture(scope="session")
def shared_e3(model_dir):
    """One eager float32 E3 engine for the modules that ask policy questions
    per request (`test_overrides`): policy e3 by default, exits 8/15/22, the
    synthetic "middle" profile as the engine's own (a request turns it off
    with `e3_enabled: 0`, or replaces it through `_e3_test`), 32 runner slots
    and 16 admitted (E3's setting), groups below 12 park at every exit, at
    most 3 steps. Used by test_token_exits, test_e3_regroup, test_features
    and test_serving."""
    from vllm import LLM

    from helpers import SHARED_E3, free_engine

    llm = LLM(model_dir, model_impl="e3", dtype="float32", enforce_eager=True, max_model_len=1024,
              max_num_seqs=32, max_num_active_seqs=16, seed=0, additional_config={"e3": SHARED_E3})
    held = _hold("shared_e3", llm, lambda: free_engine(llm))
    yield held.value
    held.close()


@pytest.fixture(scope="session")
def vanilla_eager(model_dir):
    """Vanilla vLLM's own ids (eager, float32) for the modules that compare
    with it, generated once; the engine is freed at once."""
    from vllm import LLM, SamplingParams

    from helpers import PROMPTS, free_engine

    llm = LLM(model_dir, dtype="float32", enforce_eager=True, max_num_seqs=32, seed=0)
    runs = {}
    # test_token_exits: 24 tokens whatever the EOS
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    runs["ignore_eos_24"] = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    # test_full_policy: up to 32 tokens, stopping at EOS
    sp = SamplingParams(temperature=0, max_tokens=32)
    runs["eos_32"] = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    free_engine(llm)
    return runs


@pytest.fixture(scope="session")
def reference(model_dir):
    """The plain-PyTorch float32 reference of the embedded model (identity
    ramps), each (prompt, settings) generated once for the whole session."""
    import torch

    from helpers import MAX_TOKENS, CachedReference

    torch.set_num_threads(1)  # tiny ops: OpenMP sync costs more than it gains
    return CachedReference(model_dir, MAX_TOKENS)


@pytest.fixture(scope="session")
def knobs_server(model_dir, tmp_path_factory):
    """`vllm serve --model-impl e3` (eager, float32) on a planted deployment:
    exits 8/15/22 that never fire by default, and a calibration table whose
    rows send every token out at 15 (target <= 0.9), at 22 (<= 0.95), or
    nowhere (0.99). Used by test_serving (knobs, statistics, bad input) and
    test_serve (chat through the openai client)."""
    from servers import KNOBS_ARGS, PLANTED_CONFIG, PLANTED_TABLE, PLUGINS, planted_model_dir, vllm_server

    planted = planted_model_dir(model_dir, str(tmp_path_factory.mktemp("planted") / "model"),
                                PLANTED_CONFIG, PLANTED_TABLE)
    log = tmp_path_factory.mktemp("knobs") / "server.log"
    ctx = vllm_server(planted, KNOBS_ARGS, log, PLUGINS)
    url, _ = ctx.__enter__()
    _knobs_log.append(log)
    held = _hold("knobs_server", url, lambda: ctx.__exit__(None, None, None))
    yield held.value
    held.close()


_knobs_log: list = []


@pytest.fixture(scope="session")
def knobs_server_log(knobs_server):
    """The knobs server's log file."""
    return _knobs_log[-1]


@pytest.fixture(scope="session")
def tiny_planted(tmp_path_factory):
    """The random 8-layer Llama with planted ramps (tests/tiny_parallel.py)
    and its cached reference, shared by the TP and PP modules."""
    from tiny_parallel import planted_tiny, reference as tiny_reference

    d = planted_tiny(tmp_path_factory, "tiny-parallel")
    return d, tiny_reference(d)


def _uses(item, name: str) -> bool:
    return name in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """The modules that share an engine run one after another, each group in
    SHARED's order after everything else; a module that also uses the next
    group's engine runs last in its group, so that engine starts right before
    its other users. Each module's own order is kept (the sort is stable)."""
    groups: dict[str, list[int]] = {}
    for item in items:
        used = groups.setdefault(_module(item), [])
        used += [i + 1 for i, name in enumerate(SHARED) if _uses(item, name) and i + 1 not in used]
    items.sort(key=lambda item: (min(groups[_module(item)], default=0), max(groups[_module(item)], default=0)))


def _module(item) -> str:
    return item.module.__name__ if item.module is not None else ""


def pytest_runtest_teardown(item, nextitem):
    """Free a shared engine after the last test that uses it."""
    for name, held in list(_shared.items()):
        if _uses(item, name) and (nextitem is None or not _later_uses(nextitem, name)):
            held.close()
            del _shared[name]


def _later_uses(nextitem, name: str) -> bool:
    """Whether `nextitem` or any test after it uses `name` (items are sorted
    so that users are consecutive, but a module's tests between two users
    may not use it)."""
    items = nextitem.session.items
    return any(_uses(it, name) for it in items[items.index(nextitem):])
