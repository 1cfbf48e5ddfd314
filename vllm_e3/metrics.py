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
put vLLM's metrics in Prometheus' multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`):
each `/metrics` scrape builds a fresh registry over the per-process value
files in that directory, and no registered collector is ever read. There
the publisher writes the same counters as `prometheus_client` counters
instead (`MultiprocessCounters`), into that directory, as vLLM's own
processes do; the scrape adds them over processes, which adds an engine's
pipeline ranks. The audit's agreement gauges are derived per scrape and so
exist only in single-server mode; their two counters are in both.
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

from . import envs

PERIOD_S = 0.25
PREFIX = "vllm_e3:"


# (metric, help, ExitStats key, label of the per-key series or None): every E3 counter family
FAMILIES = [
    ("decode_tokens", "Decode tokens computed by the E3 model", "decode_tokens", None),
    ("tokens_exited", "Decode tokens that left at an exit point", "exited", "exit"),
    ("decoder_layers_run", "Decoder layers run by decode tokens", "layers_run", None),
    ("decoder_layers_full", "Decoder layers the same tokens run without exits", "layers_full", None),
    ("kv_fill_rows", "KV-fill work: one per exited token per skipped layer", "kv_fill_rows", None),
    ("tokens_parked", "Decode tokens parked to regroup (policy e3)", "parked", None),
    ("tokens_resumed", "Parked tokens resumed where they stopped", "resumed", None),
    ("park_wait_tokens", "Tokens by the steps they waited parked", "park_wait_hist", "steps"),
    ("stage_rows", "Decode rows run per stage (mean stage batch = rows / runs)", "stage_rows", "stage_start"),
    ("stage_runs", "Stage runs with decode rows", "stage_runs", "stage_start"),
    ("audit_tokens", "Exited tokens the online audit also ran to the last layer", "audited", "exit"),
    ("audit_agreements", "Audited tokens whose exit top-1 is the full model's", "audit_agreed", "exit"),
]


def series(s: dict, key: str, label: str | None) -> list[tuple[str | None, float]]:
    """(label value or None, count) of one family in counters `s`."""
    if label is None:
        return [(None, s[key])]
    return [(str(k), v) for k, v in sorted(s.get(key, {}).items(), key=lambda kv: int(kv[0]))]


# ---- worker ------------------------------------------------------------------------------------
class MultiprocessCounters:
    """The counters as `prometheus_client` counters in multiprocess mode
    (their values go to this process's files in PROMETHEUS_MULTIPROC_DIR),
    advanced by the growth of each snapshot over the last; a reset of the
    worker's counters starts from the new values."""

    def __init__(self, model_name: str, engine: int):
        from prometheus_client import Counter

        self.base = [model_name, str(engine)]
        self.counters = {name: Counter(PREFIX + name, doc, ["model_name", "engine", *([label] if label else [])],
                                       registry=None)
                         for name, doc, _, label in FAMILIES}
        self.seen: dict[tuple, float] = {}

    def update(self, snap: dict) -> None:
        for name, _, key, label in FAMILIES:
            for value, n in series(snap, key, label):
                labels = self.base + ([value] if label else [])
                grown = n - self.seen.get((name, *labels), 0)
                if grown > 0:
                    self.counters[name].labels(*labels).inc(grown)
                self.seen[(name, *labels)] = n


class StatsPublisher:
    """Publishes the runner's exit counters (vllm_e3.runtime) while they
    change: as JSON to `path`, or to `prom` (MultiprocessCounters)."""

    def __init__(self, runtime, path: str, rank: dict[str, int], prom: MultiprocessCounters | None = None):
        self.runtime, self.path, self.rank, self.prom = runtime, path, rank, prom
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
        if self.prom is not None:
            self.prom.update(snap)
            self._last = snap
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
    d, model_name, _ = envs.stats_channel()
    if not d or runtime is None or rank["tp"] != 0 or not os.path.isdir(d):
        return None
    prom = MultiprocessCounters(model_name, rank["dp"]) if envs.prometheus_multiproc() else None
    return StatsPublisher(runtime, os.path.join(d, f"exit_stats.dp{rank['dp']}.pp{rank['pp']}.json"), rank,
                          prom)


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
        """Every E3 metric family (FAMILIES); one series per engine and label
        value."""
        from prometheus_client.core import CounterMetricFamily

        for name, doc, key, label in FAMILIES:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name", "engine", *([label] if label else [])])
            for dp, s in engines.items():
                for value, n in series(s, key, label):
                    c.add_metric([self.model_name, str(dp), *([value] if label else [])], n)
            yield c
        if any(s.get("audited") for s in engines.values()):
            yield from self.audit_gauges(engines)

    def audit_gauges(self, engines: dict[int, dict]):
        """The online audit (E3Config.audit_rate), per engine, per exit and over all
        exits: the live agreement with its one-sided 95% Clopper-Pearson lower bound
        (1 - the upper bound on the disagreement rate, vllm_e3.bounds), cached per count."""
        from prometheus_client.core import GaugeMetricFamily

        from .bounds import cp_upper

        labels = ["model_name", "engine", "exit"]
        live = GaugeMetricFamily(PREFIX + "audit_agreement", "Audited agreement of exited tokens with "
                                 "the full model's top-1", labels=labels)
        low = GaugeMetricFamily(PREFIX + "audit_agreement_lower_95", "One-sided 95% Clopper-Pearson "
                                "lower bound on that agreement", labels=labels)
        for dp, s in engines.items():
            audited, agreed = s.get("audited", {}), s.get("audit_agreed", {})
            if not audited:
                continue
            groups = [(e, n, agreed.get(e, 0)) for e, n in series(s, "audited", "exit")]
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


def prepare_frontend(model_name: str) -> str:
    """For an `--model-impl e3` engine about to start: a fresh stats directory
    (in the environment its processes inherit) and the collector pointed at
    it. Returns the directory."""
    global _collector
    d, _, owner = envs.stats_channel()
    if not (d and owner != str(os.getpid()) and os.path.isdir(d)):
        # a fresh directory, unless this process is a child of the front end
        # that made one (an API server of several builds its config again)
        d = tempfile.mkdtemp(prefix="vllm-e3-stats-")
        atexit.register(shutil.rmtree, d, True)
        envs.set_stats_channel(d, model_name)
    with _lock:
        if _collector is None:
            from prometheus_client import REGISTRY

            _collector = E3Collector()
            REGISTRY.register(_collector)
        _collector.dir, _collector.model_name = d, model_name
    return d
