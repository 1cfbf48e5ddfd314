"""Exit metrics on the server's `/metrics`, in vLLM's Prometheus registry.

The counters live in the worker (the model's `ExitStats`); `/metrics` is
served by the API server, another process. vLLM's channels between the two
(`SchedulerStats`, the stat-logger plugins) are typed or touch every engine,
so the worker publishes its counters instead:

- front end (the create_engine_config wrapper, `--model-impl e3` only):
  `prepare_frontend()` picks a file in a fresh private temp directory, puts
  its path in `VLLM_E3_STATS_FILE` for the engine processes it is about to
  start, and registers `E3Collector` in vLLM's registry once per process;
- worker: `StatsPublisher` (a daemon thread) rewrites that file atomically
  every `PERIOD_S` while the counters change;
- `/metrics`: the collector reads the file at each scrape (at most `PERIOD_S`
  behind the engine).

Vanilla engines never run any of this. With `PROMETHEUS_MULTIPROC_DIR` set
(several API servers) vLLM scrapes a per-scrape registry and these metrics
are not shown.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import threading
import time

logger = logging.getLogger("vllm.e3")

STATS_ENV = "VLLM_E3_STATS_FILE"
PERIOD_S = 0.25
PREFIX = "vllm_e3:"


# ---- worker ------------------------------------------------------------------------------------
class StatsPublisher:
    """Writes the runner's exit counters (vllm_e3.runtime) as JSON to `path`
    while they change."""

    def __init__(self, runtime, path: str):
        self.runtime, self.path = runtime, path
        self._last = None
        threading.Thread(target=self._run, name="vllm-e3-stats", daemon=True).start()

    def snapshot(self) -> dict | None:
        from .stats import exit_stats

        for _ in range(3):    # the forward may grow a dict meanwhile: try again
            try:
                return exit_stats(self.runtime)
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


def start_publisher(runtime) -> StatsPublisher | None:
    path = os.environ.get(STATS_ENV)
    if not path or runtime is None or not os.path.isdir(os.path.dirname(path)):
        return None
    return StatsPublisher(runtime, path)


# ---- front end ---------------------------------------------------------------------------------
class E3Collector:
    """Prometheus collector over the worker's published counters."""

    def __init__(self):
        self.path: str | None = None
        self.model_name = ""
        self._bounds: dict[tuple[int, int], float] = {}   # (disagreements, audited) -> bound

    def read(self) -> dict | None:
        if not self.path:
            return None
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        s = self.read()
        if s is None:
            return
        m = [self.model_name]

        def counter(name, doc, value, labels=(), by_label=()):
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name", *labels])
            if labels:
                for key, v in by_label:
                    c.add_metric([*m, str(key)], v)
            else:
                c.add_metric(m, value)
            return c

        def by_key(d):
            return sorted(d.items(), key=lambda kv: int(kv[0]))

        yield counter("decode_tokens", "Decode tokens computed by the E3 model", s["decode_tokens"])
        yield counter("tokens_exited", "Decode tokens that left at an exit point", 0, ["exit"],
                      by_key(s["exited"]))
        yield counter("decoder_layers_run", "Decoder layers run by decode tokens", s["layers_run"])
        yield counter("decoder_layers_full", "Decoder layers the same tokens run without exits",
                      s["layers_full"])
        yield counter("kv_fill_rows", "KV-fill work: one per exited token per skipped layer",
                      s["kv_fill_rows"])
        yield counter("tokens_parked", "Decode tokens parked to regroup (policy e3)", s["parked"])
        yield counter("tokens_resumed", "Parked tokens resumed where they stopped", s["resumed"])
        yield counter("park_wait_tokens", "Tokens by the steps they waited parked", 0, ["steps"],
                      by_key(s["park_wait_hist"]))
        yield counter("stage_rows", "Decode rows run per stage (mean stage batch = rows / runs)", 0,
                      ["stage_start"], by_key(s["stage_rows"]))
        yield counter("stage_runs", "Stage runs with decode rows", 0, ["stage_start"],
                      by_key(s["stage_runs"]))
        audited, agreed = s.get("audited", {}), s.get("audit_agreed", {})
        if audited:
            yield from self.audit_metrics(m, audited, agreed, counter, by_key)

    def audit_metrics(self, m, audited: dict, agreed: dict, counter, by_key):
        """The online audit (E3Config.audit_rate): counters per exit, and per exit and over
        all exits the live agreement with its one-sided 95% Clopper-Pearson lower bound
        (1 - the upper bound on the disagreement rate, vllm_e3.bounds), cached per count."""
        from prometheus_client.core import GaugeMetricFamily

        from .bounds import cp_upper

        yield counter("audit_tokens", "Exited tokens the online audit also ran to the last layer", 0,
                      ["exit"], by_key(audited))
        yield counter("audit_agreements", "Audited tokens whose exit top-1 is the full model's", 0,
                      ["exit"], by_key(agreed))
        live = GaugeMetricFamily(PREFIX + "audit_agreement", "Audited agreement of exited tokens with "
                                 "the full model's top-1", labels=["model_name", "exit"])
        low = GaugeMetricFamily(PREFIX + "audit_agreement_lower_95", "One-sided 95% Clopper-Pearson "
                                "lower bound on that agreement", labels=["model_name", "exit"])
        groups = [(str(e), n, agreed.get(e, 0)) for e, n in by_key(audited)]
        groups.append(("all", sum(audited.values()), sum(agreed.values())))
        for label, n, a in groups:
            key = (n - a, n)
            if key not in self._bounds:
                self._bounds[key] = 1.0 - cp_upper(n - a, n)
            live.add_metric([*m, label], a / n if n else 1.0)
            low.add_metric([*m, label], self._bounds[key])
        yield live
        yield low


_collector: E3Collector | None = None
_lock = threading.Lock()


def prepare_frontend(model_name: str) -> str:
    """For an `--model-impl e3` engine about to start: a fresh stats file path
    (in the environment its processes inherit) and the collector pointed at
    it. Returns the path."""
    global _collector
    d = tempfile.mkdtemp(prefix="vllm-e3-stats-")
    atexit.register(shutil.rmtree, d, True)
    path = os.path.join(d, "exit_stats.json")
    os.environ[STATS_ENV] = path
    with _lock:
        if _collector is None:
            from vllm.v1.metrics.prometheus import get_prometheus_registry

            _collector = E3Collector()
            get_prometheus_registry().register(_collector)
        _collector.path, _collector.model_name = path, model_name
    return path
