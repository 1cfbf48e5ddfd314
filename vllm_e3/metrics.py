"""Exit metrics on the server's `/metrics`, in vLLM's Prometheus registry.

The counters live in the worker (the model's `ExitStats`); `/metrics` is
served by the API server, another process. vLLM's channels between the two
(`SchedulerStats`, the stat-logger plugins) are typed or touch every engine,
so the worker publishes its counters instead:

- front end (the create_engine_config wrapper, `--model-impl e3` only):
  `prepare_frontend()` makes a fresh private temp directory, puts its path in
  `VLLM_E3_STATS_DIR` (and the served model name in `VLLM_E3_MODEL_NAME`)
  for the processes it is about to start, and registers `E3Collector` in
  vLLM's registry once per process;
- worker: `StatsPublisher` (a daemon thread) rewrites its own file,
  `exit_stats.dp<engine>.pp<rank>.json`, atomically every `PERIOD_S` while
  the counters change. Tensor-parallel ranks hold the same counters, so only
  TP rank 0 publishes; pipeline ranks each publish what they count;
- `/metrics`: the collector reads the files at each scrape (at most
  `PERIOD_S` behind the engines), adds each engine's pipeline ranks
  (`vllm_e3.stats.engine_stats`) and labels the series by engine, as vLLM
  labels its own (`engine="0"`, `"1"`, ... under `--data-parallel-size`).

Several API servers (vLLM's default under `--data-parallel-size N` is N)
make vLLM serve `/metrics` from a registry it builds per process in
multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`), which the front end's
registration never reaches: patches/patch_metrics_registry.py registers the
collector in that registry too, in each API server process (patch 6).
Vanilla engines never run any of this.
"""
from __future__ import annotations

import atexit
import glob
import json
import logging
import os
import shutil
import tempfile
import threading
import time

logger = logging.getLogger("vllm.e3")

STATS_ENV = "VLLM_E3_STATS_DIR"
MODEL_ENV = "VLLM_E3_MODEL_NAME"
PERIOD_S = 0.25
PREFIX = "vllm_e3:"


# ---- worker ------------------------------------------------------------------------------------
class StatsPublisher:
    """Writes the runner's exit counters (vllm_e3.runtime) as JSON to `path`
    while they change."""

    def __init__(self, runtime, path: str, rank: dict[str, int]):
        self.runtime, self.path, self.rank = runtime, path, rank
        self._last = None
        threading.Thread(target=self._run, name="vllm-e3-stats", daemon=True).start()

    def snapshot(self) -> dict | None:
        from .stats import exit_stats

        for _ in range(3):    # the forward may grow a dict meanwhile: try again
            try:
                return exit_stats(self.runtime, self.rank)
            except RuntimeError:
                time.sleep(0.001)
        return None

    def publish(self) -> None:
        snap = self.snapshot()
        if snap is None or snap == self._last:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        # 0600 whatever the umask: the counters are this server's business
        # (the directory is 0700 too, from mkdtemp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(snap, f)
        os.replace(tmp, self.path)
        self._last = snap

    def _run(self) -> None:
        while True:
            time.sleep(PERIOD_S)
            try:
                self.publish()
            except OSError:          # the front end went away with its directory
                return


def start_publisher(runtime, rank: dict[str, int]) -> StatsPublisher | None:
    """A publisher for this worker (TP rank 0 only; `rank` from E3CPUWorker.e3_rank)."""
    d = os.environ.get(STATS_ENV)
    if not d or runtime is None or rank["tp"] != 0 or not os.path.isdir(d):
        return None
    return StatsPublisher(runtime, os.path.join(d, f"exit_stats.dp{rank['dp']}.pp{rank['pp']}.json"), rank)


# ---- front end ---------------------------------------------------------------------------------
class E3Collector:
    """Prometheus collector over the worker's published counters."""

    def __init__(self, stats_dir: str | None = None, model_name: str = ""):
        self.dir = stats_dir
        self.model_name = model_name
        self._bounds: dict[tuple[int, int], float] = {}   # (disagreements, audited) -> bound

    def read(self) -> dict[int, dict]:
        """Each engine's counters, by data-parallel rank (pipeline ranks added)."""
        from .stats import engine_stats

        ranks: dict[int, list[dict]] = {}
        for path in sorted(glob.glob(os.path.join(self.dir or "", "exit_stats.dp*.pp*.json"))):
            try:
                with open(path) as f:
                    s = json.load(f)
            except (OSError, ValueError):
                continue
            ranks.setdefault(s["rank"]["dp"], []).append(s)
        return {dp: engine_stats(parts) for dp, parts in sorted(ranks.items())}

    def collect(self):
        engines = self.read() if self.dir else {}
        if engines:
            yield from self.families(engines)

    def families(self, engines: dict[int, dict]):
        """Every E3 metric family; one series per engine (and label value)."""
        from prometheus_client.core import CounterMetricFamily

        def counter(name, doc, key, labels=()):
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name", "engine", *labels])
            for dp, s in engines.items():
                m = [self.model_name, str(dp)]
                if labels:
                    for k, v in by_key(s[key]):
                        c.add_metric([*m, str(k)], v)
                else:
                    c.add_metric(m, s[key])
            return c

        def by_key(d):
            return sorted(d.items(), key=lambda kv: int(kv[0]))

        yield counter("decode_tokens", "Decode tokens computed by the E3 model", "decode_tokens")
        yield counter("tokens_exited", "Decode tokens that left at an exit point", "exited", ["exit"])
        yield counter("decoder_layers_run", "Decoder layers run by decode tokens", "layers_run")
        yield counter("decoder_layers_full", "Decoder layers the same tokens run without exits",
                      "layers_full")
        yield counter("kv_fill_rows", "KV-fill work: one per exited token per skipped layer",
                      "kv_fill_rows")
        yield counter("tokens_parked", "Decode tokens parked to regroup (policy e3)", "parked")
        yield counter("tokens_resumed", "Parked tokens resumed where they stopped", "resumed")
        yield counter("park_wait_tokens", "Tokens by the steps they waited parked", "park_wait_hist",
                      ["steps"])
        yield counter("stage_rows", "Decode rows run per stage (mean stage batch = rows / runs)",
                      "stage_rows", ["stage_start"])
        yield counter("stage_runs", "Stage runs with decode rows", "stage_runs", ["stage_start"])
        if any(s.get("audited") for s in engines.values()):
            yield from self.audit_metrics(engines, counter, by_key)

    def audit_metrics(self, engines: dict[int, dict], counter, by_key):
        """The online audit (E3Config.audit_rate): counters per exit, and per exit and over
        all exits the live agreement with its one-sided 95% Clopper-Pearson lower bound
        (1 - the upper bound on the disagreement rate, vllm_e3.bounds), cached per count;
        per engine."""
        from prometheus_client.core import GaugeMetricFamily

        from .bounds import cp_upper

        yield counter("audit_tokens", "Exited tokens the online audit also ran to the last layer",
                      "audited", ["exit"])
        yield counter("audit_agreements", "Audited tokens whose exit top-1 is the full model's",
                      "audit_agreed", ["exit"])
        labels = ["model_name", "engine", "exit"]
        live = GaugeMetricFamily(PREFIX + "audit_agreement", "Audited agreement of exited tokens with "
                                 "the full model's top-1", labels=labels)
        low = GaugeMetricFamily(PREFIX + "audit_agreement_lower_95", "One-sided 95% Clopper-Pearson "
                                "lower bound on that agreement", labels=labels)
        for dp, s in engines.items():
            audited, agreed = s.get("audited", {}), s.get("audit_agreed", {})
            if not audited:
                continue
            groups = [(str(e), n, agreed.get(e, 0)) for e, n in by_key(audited)]
            groups.append(("all", sum(audited.values()), sum(agreed.values())))
            for label, n, a in groups:
                key = (n - a, n)
                if key not in self._bounds:
                    self._bounds[key] = 1.0 - cp_upper(n - a, n)
                live.add_metric([self.model_name, str(dp), label], a / n if n else 1.0)
                low.add_metric([self.model_name, str(dp), label], self._bounds[key])
        yield live
        yield low


_collector: E3Collector | None = None
_lock = threading.Lock()


def register_collector(registry) -> E3Collector | None:
    """An E3Collector over this process's `VLLM_E3_STATS_DIR`, registered in
    `registry` (a per-process multiprocess registry: patch 6); None when this
    process serves no E3 engine."""
    d = os.environ.get(STATS_ENV)
    if not d:
        return None
    c = E3Collector(d, os.environ.get(MODEL_ENV, ""))
    registry.register(c)
    return c


def prepare_frontend(model_name: str) -> str:
    """For an `--model-impl e3` engine about to start: a fresh stats directory
    (in the environment its processes inherit) and the collector pointed at
    it. Returns the directory."""
    global _collector
    d = tempfile.mkdtemp(prefix="vllm-e3-stats-")
    atexit.register(shutil.rmtree, d, True)
    os.environ[STATS_ENV] = d
    os.environ[MODEL_ENV] = model_name
    with _lock:
        if _collector is None:
            from prometheus_client import REGISTRY

            _collector = E3Collector()
            REGISTRY.register(_collector)
        _collector.dir, _collector.model_name = d, model_name
    return d
