"""Online serving goodput: vanilla `vllm serve` against `vllm serve --model-impl e3`.

Each side is a real server on loopback, started one at a time with the same
flags (float32, eager, same --max-num-seqs, prefix caching off on both: the
benchmark reuses the same random prompts at every rate, and policy e3 turns it
off anyway); `vllm bench serve` (random dataset, fixed seed, temperature 0,
ignore_eos so every request decodes exactly --output-len tokens) then sends
the same prompts with the same Poisson arrival times at each request rate.

Goodput is vLLM's `request_goodput`: completed requests whose own TPOT,
(latency - TTFT) / (output tokens - 1), is within the SLO, divided by the
benchmark duration (first send to last completion). The SLO is
--slo-factor x the unloaded vanilla TPOT (p50 of --calib-prompts requests
sent one at a time, measured right after the first vanilla server starts),
unless --slo-tpot-ms fixes it: "a request is served well if it decodes at no
worse than half the speed an idle vanilla server gives it" (the DistServe
convention of scaling latency SLOs to the single-request latency), so the
figure carries over between machines.

Fairness: the sides alternate (repeat r runs vanilla, e3 for even r and the
reverse for odd r), each repeat restarts every server, every side runs the
rates in the same order after the same warm-up, and medians over --repeats are
reported. Every request must succeed and return --output-len tokens, or the
run stops.

    .venv/bin/python benchmarks/bench_serve.py                     # ~15 min on 2 quiet cores
    .venv/bin/python benchmarks/bench_serve.py --sides vanilla,token,e3
    .venv/bin/python benchmarks/bench_serve.py --rates 1,inf --num-prompts 20 --repeats 1 \\
        --out benchmarks/results/serve_goodput_tiny.json --note "tiny smoke run"

Writes benchmarks/results/serve_goodput.json and serve_goodput.png (goodput
and p99 TPOT against request rate).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
NAME = "smollm2-135m-instruct"
EXITS = [8, 15, 22]
PROFILES = {   # the synthetic exit profiles of bench_policies.py
    "none": {},
    "middle": {"8": 0.3, "15": 0.357, "22": 0.444},   # 30% / 25% / 20% of tokens at 8 / 15 / 22
    "half@8": {"8": 0.5},
}
SIDES = ("vanilla", "token", "e3")
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_TARGET_DEVICE": "cpu"}


# ---- servers -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def side_flags(side: str, args) -> list[str]:
    if side == "vanilla":
        return []
    # exits leave by the synthetic profile only: no thresholds, and a confidence
    # measure that needs no trained tensors (the model dir's e3/config.json,
    # which `vllm-e3 prepare` deploys, may ask for gates at other exits); exits
    # without ramp tensors in e3/ramps.safetensors use the identity ramp
    e3 = {"policy": side, "exits": EXITS, "thresholds": [None] * len(EXITS),
          "confidence": "max_prob", "force_exit": PROFILES[args.profile]}
    if side == "e3" and args.target_batch is not None:
        e3["target_batch"] = args.target_batch
    return ["--model-impl", "e3", "--additional-config", json.dumps({"e3": e3})]


def server_cmd(side: str, args, model: str, port: int) -> list[str]:
    return [os.path.join(BIN, "vllm"), "serve", model, "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", NAME, "--dtype", args.dtype, "--enforce-eager",
            "--max-num-seqs", str(args.max_num_seqs), "--no-enable-prefix-caching",
            *side_flags(side, args), *shlex.split(args.server_args)]


class Server:
    def __init__(self, side: str, args, model: str, log_dir: str, tag: str):
        self.side, self.port = side, free_port()
        self.cmd = server_cmd(side, args, model, self.port)
        self.log_path = os.path.join(log_dir, f"server-{tag}.log")
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **SERVER_ENV}
        self.log = open(self.log_path, "w")
        t0 = time.perf_counter()
        # own session: stop() signals this server's process group (its engine core) by id
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        try:
            self._wait_healthy(args.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - t0

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"{self.side} server exited with {self.proc.returncode} while starting")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        models = json.load(urllib.request.urlopen(self.url + "/v1/models", timeout=5))
                        names = [m["id"] for m in models["data"]]
                        if NAME not in names:
                            self.fail(f"server serves {names}, not {NAME}")
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1)
        self.fail(f"{self.side} server not healthy after {timeout:.0f} s")

    def tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def fail(self, msg: str):
        raise SystemExit(f"FAILED: {msg}\n--- {self.log_path} (tail) ---\n{self.tail()}")

    def e3_counters(self) -> dict[str, float] | None:
        """The `vllm_e3:` samples of /metrics (None when the server has none)."""
        try:
            text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        except (urllib.error.URLError, OSError):
            return None
        out = {}
        for line in text.splitlines():
            if line.startswith("vllm_e3:") and not line.endswith("_created"):
                key, _, val = line.rpartition(" ")
                if "_created{" in key:
                    continue
                key = key.replace(f'model_name="{NAME}"', "").replace("{,", "{").replace("{}", "")
                out[key] = float(val)
        return out or None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        else:   # the server died: take anything left in its group with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


# ---- vllm bench serve --------------------------------------------------------------------------
_bench = None


def bench_argv(args, server: Server, model: str, rate: str, n: int, slo_ms: float | None,
               result_dir: str, filename: str, max_concurrency: int | None = None) -> list[str]:
    argv = ["--backend", "openai", "--host", "127.0.0.1", "--port", str(server.port),
            "--model", NAME, "--tokenizer", model,
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--ignore-eos",
            "--seed", str(args.seed), "--temperature", "0",
            "--num-prompts", str(n), "--request-rate", rate,
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--disable-tqdm", "--save-result", "--save-detailed",
            "--result-dir", result_dir, "--result-filename", filename,
            "--label", server.side]
    if slo_ms is not None:
        argv += ["--goodput", f"tpot:{slo_ms:g}"]
        if args.slo_ttft_ms is not None:
            argv += [f"ttft:{args.slo_ttft_ms:g}"]
    if max_concurrency is not None:
        argv += ["--max-concurrency", str(max_concurrency)]
    return argv


def run_bench(args, argv: list[str], log_path: str, server: Server) -> dict:
    """`vllm bench serve argv`: in this process by default (the CLI's own
    parser and main(); saves vLLM's ~10 s import per call), or as the CLI
    with --bench-cli. Returns the saved result JSON."""
    global _bench
    i = argv.index("--result-dir")
    path = os.path.join(argv[i + 1], argv[argv.index("--result-filename") + 1])
    with open(log_path, "w") as log:
        log.write("vllm bench serve " + shlex.join(argv) + "\n")
        log.flush()
        if args.bench_cli:
            rc = subprocess.call([os.path.join(BIN, "vllm"), "bench", "serve", *argv],
                                 stdout=log, stderr=subprocess.STDOUT)
            if rc != 0:
                server.fail(f"vllm bench serve exited with {rc}; see {log_path}")
        else:
            if _bench is None:
                from vllm.benchmarks.serve import add_cli_args, main
                from vllm.utils.argparse_utils import FlexibleArgumentParser

                p = FlexibleArgumentParser()
                add_cli_args(p)
                _bench = (p, main)
            p, main = _bench
            with contextlib.redirect_stdout(log):
                main(p.parse_args(argv))
    with open(path) as f:
        return json.load(f)


def check(res: dict, n: int, args, server: Server, what: str) -> None:
    """Every request succeeded and decoded exactly --output-len tokens."""
    errors = [e for e in res.get("errors", []) if e]
    lens = res.get("output_lens", [])
    bad = [k for k, L in enumerate(lens) if L != args.output_len]
    if res.get("failed", 0) or res.get("completed") != n or errors or len(lens) != n or bad:
        raise SystemExit(
            f"FAILED: {what}: completed {res.get('completed')} of {n}, failed {res.get('failed')}, "
            f"{len(bad)} with output length != {args.output_len}; errors: {errors[:5]}\n"
            f"--- {server.log_path} (tail) ---\n{server.tail()}")
    if server.proc.poll() is not None:
        server.fail(f"{server.side} server died during {what}")


def per_request_tpot_ms(res: dict) -> list[float]:
    """bench serve's own per-request TPOT (the one its goodput uses)."""
    out = []
    for lat, ttft, n in zip(res["latencies"], res["ttfts"], res["output_lens"]):
        out.append(1e3 * (lat - ttft) / (n - 1) if n > 1 else 0.0)
    return out


KEEP = ("duration", "completed", "failed", "request_rate", "request_throughput", "request_goodput",
        "output_throughput", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
        "p50_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p99_itl_ms", "p50_e2el_ms", "p99_e2el_ms",
        "max_concurrent_requests")


def label(key: str, name: str) -> str:
    m = re.search(name + r'="([^"]*)"', key)
    return m.group(1) if m else key


def e3_summary(before: dict | None, after: dict | None) -> dict | None:
    if not before or not after:
        return None
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    tok = d.get("vllm_e3:decode_tokens_total", 0.0)
    full = d.get("vllm_e3:decoder_layers_full_total", 0.0)
    s = {"decode_tokens": tok,
         "layers_run_fraction": d.get("vllm_e3:decoder_layers_run_total", 0.0) / full if full else None,
         "exit_share": {label(k, "exit"): v / tok
                        for k, v in d.items() if k.startswith("vllm_e3:tokens_exited") and tok},
         "tokens_parked": d.get("vllm_e3:tokens_parked_total")}
    runs = {label(k, "stage_start"): v for k, v in d.items() if k.startswith("vllm_e3:stage_runs")}
    rows = {label(k, "stage_start"): v for k, v in d.items() if k.startswith("vllm_e3:stage_rows")}
    s["mean_stage_batch"] = {k: rows.get(k, 0.0) / v for k, v in sorted(runs.items(), key=lambda kv: int(kv[0])) if v}
    return s


# ---- main --------------------------------------------------------------------------------------
def rate_key(r: str) -> str:
    return "inf" if math.isinf(float(r)) else f"{float(r):g}"


def estimate_s(args, sides) -> float:
    """Rough wall time on this 2-core machine (quiet): ~40 s per server start,
    ~55 ms unloaded TPOT, ~1.8 req/s saturated (vanilla, 64/64), ~100 ms TPOT
    for the last request's tail."""
    out_s = args.output_len * 0.055
    per = 40 + args.calib_prompts * (out_s + 0.3) + 5
    for r in args.rates:
        r = float(r)
        per += max(args.num_prompts / r if not math.isinf(r) else 0,
                   args.num_prompts / 1.8 * args.output_len / 64) + args.output_len * 0.1 + 3
    return per * len(sides) * args.repeats


def median_or_none(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", default="vanilla,token",
                    help="comma list from vanilla, token (policy token), e3 (policy e3); vanilla first")
    ap.add_argument("--profile", default="middle", choices=sorted(PROFILES),
                    help="synthetic exit profile (force_exit) of the e3 sides, exits 8/15/22")
    ap.add_argument("--target-batch", type=int, default=None, help="policy e3's target_batch")
    ap.add_argument("--rates", default="0.5,1,1.5,2,inf", help="request rates (req/s), comma list")
    ap.add_argument("--num-prompts", type=int, default=24, help="requests per rate")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--dtype", default="float32",
                    help="float32: bf16 GEMMs are emulated on this AVX2-only CPU")
    ap.add_argument("--seed", type=int, default=0, help="bench serve's seed (prompts, arrival times)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of (every side x every rate)")
    ap.add_argument("--calib-prompts", type=int, default=4,
                    help="requests sent one at a time after each start: warm-up and unloaded TPOT")
    ap.add_argument("--slo-factor", type=float, default=2.0,
                    help="TPOT SLO = this x unloaded vanilla TPOT p50 (first vanilla start)")
    ap.add_argument("--slo-tpot-ms", type=float, default=None, help="fix the TPOT SLO instead")
    ap.add_argument("--slo-ttft-ms", type=float, default=None, help="add a TTFT SLO (default none)")
    ap.add_argument("--server-args", default="", help="more `vllm serve` flags, on every side")
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--bench-cli", action="store_true",
                    help="run `vllm bench serve` as a subprocess instead of in this process")
    ap.add_argument("--model", default=None, help="model dir (default: `vllm-e3 prepare`)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "serve_goodput.json"))
    ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    ap.add_argument("--keep-dir", default=None, help="keep bench results and server logs here")
    ap.add_argument("--note", default="", help="stored in the JSON and the plot title")
    args = ap.parse_args()
    args.rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or sides[0] != "vanilla" or len(set(sides)) != len(sides) or not set(sides) <= set(SIDES):
        ap.error(f"--sides: vanilla first, then any of token, e3 (got {args.sides!r})")
    plot = args.plot or os.path.splitext(args.out)[0] + ".png"

    from common import machine

    model = args.model or subprocess.run([os.path.join(BIN, "vllm-e3"), "prepare", "--quiet"],
                                         check=True, capture_output=True, text=True
                                         ).stdout.strip().splitlines()[-1]
    e3_dir = os.path.join(model, "e3")
    artifact = sorted(os.listdir(e3_dir)) if os.path.isdir(e3_dir) else []
    work = args.keep_dir or tempfile.mkdtemp(prefix="e3-bench-serve-")
    os.makedirs(work, exist_ok=True)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    print(f"machine: {machine()}")
    print(f"model: {model} ({'e3/ holds ' + ', '.join(artifact) if artifact else 'no e3/ artifact'}), "
          f"{args.dtype}, eager, max-num-seqs {args.max_num_seqs}")
    print(f"workload: random dataset, {args.input_len} in / {args.output_len} out (ignore_eos), "
          f"temperature 0, seed {args.seed}, {args.num_prompts} prompts per rate, rates {args.rates}, "
          f"{args.repeats} repeat(s), sides {sides}, profile {args.profile} {PROFILES[args.profile]}")
    print(f"command: {command}")
    print(f"bench results and server logs: {work}")
    print(f"rough duration on 2 quiet cores: {estimate_s(args, sides)/60:.0f} min", flush=True)

    slo_ms = args.slo_tpot_ms
    slo_how = "fixed by --slo-tpot-ms" if slo_ms is not None else None
    runs, unloaded, starts, servers_cmd = [], {s: [] for s in sides}, {s: [] for s in sides}, {}
    t_all = time.perf_counter()
    for rep in range(args.repeats):
        order = sides if rep % 2 == 0 else sides[::-1]
        for side in order:
            tag = f"{side}-r{rep}"
            server = Server(side, args, model, work, tag)
            try:
                servers_cmd[side] = shlex.join(server.cmd).replace(str(server.port), "PORT")
                starts[side].append(server.start_s)
                print(f"[{time.perf_counter()-t_all:6.0f}s] repeat {rep} {side}: server up in "
                      f"{server.start_s:.0f} s (port {server.port})", flush=True)
                # warm-up + unloaded TPOT: requests one at a time
                argv = bench_argv(args, server, model, "inf", args.calib_prompts, None, work,
                                  f"{tag}-unloaded.json", max_concurrency=1)
                res = run_bench(args, argv, os.path.join(work, f"{tag}-unloaded.log"), server)
                check(res, args.calib_prompts, args, server, f"{side} unloaded run")
                u = statistics.median(per_request_tpot_ms(res))
                unloaded[side].append(u)
                if slo_ms is None:
                    slo_ms = float(math.ceil(args.slo_factor * u))
                    slo_how = (f"{args.slo_factor:g} x the unloaded vanilla TPOT p50 "
                               f"({u:.1f} ms, {args.calib_prompts} requests one at a time)")
                    print(f"TPOT SLO: {slo_ms:g} ms = {slo_how}", flush=True)
                print(f"[{time.perf_counter()-t_all:6.0f}s]   unloaded TPOT p50 {u:.1f} ms", flush=True)
                for rate in args.rates:
                    rk = rate_key(rate)
                    before = server.e3_counters()
                    argv = bench_argv(args, server, model, rate, args.num_prompts, slo_ms, work,
                                      f"{tag}-rate{rk}.json")
                    res = run_bench(args, argv, os.path.join(work, f"{tag}-rate{rk}.log"), server)
                    check(res, args.num_prompts, args, server, f"{side} at rate {rk}")
                    tp = per_request_tpot_ms(res)
                    good = sum(t <= slo_ms for t, ttft in zip(tp, res["ttfts"])
                               if args.slo_ttft_ms is None or 1e3 * ttft <= args.slo_ttft_ms)
                    mine = good / res["duration"]
                    if abs(mine - res["request_goodput"]) > 1e-6 * max(1.0, mine):
                        print(f"WARNING: goodput recomputed {mine} != bench serve's "
                              f"{res['request_goodput']} ({side} rate {rk})", flush=True)
                    time.sleep(0.6)   # the e3 counters reach /metrics within 0.25 s
                    row = {"side": side, "repeat": rep, "rate": rk,
                           **{k: res.get(k) for k in KEEP},
                           "good_requests": good,
                           "tpot_ms": [round(t, 2) for t in tp],
                           "ttft_ms": [round(1e3 * t, 1) for t in res["ttfts"]],
                           "e3": e3_summary(before, server.e3_counters()),
                           "bench_argv": argv}
                    runs.append(row)
                    print(f"[{time.perf_counter()-t_all:6.0f}s]   rate {rk:>4s}: goodput "
                          f"{row['request_goodput']:.3f} req/s ({good}/{args.num_prompts} within SLO), "
                          f"throughput {row['request_throughput']:.3f} req/s, TPOT p50/p99 "
                          f"{row['p50_tpot_ms']:.0f}/{row['p99_tpot_ms']:.0f} ms, TTFT p99 "
                          f"{row['p99_ttft_ms']:.0f} ms, failed {row['failed']}", flush=True)
            finally:
                server.stop()
    wall = time.perf_counter() - t_all

    # ---- medians over repeats, ratios to vanilla
    rks = [rate_key(r) for r in args.rates]
    fields = ("request_goodput", "request_throughput", "output_throughput", "p50_tpot_ms",
              "p99_tpot_ms", "p50_ttft_ms", "p99_ttft_ms", "p99_itl_ms", "p99_e2el_ms", "duration")
    summary = {}
    for side in sides:
        summary[side] = {}
        for rk in rks:
            rows = [r for r in runs if r["side"] == side and r["rate"] == rk]
            summary[side][rk] = {f: median_or_none([r[f] for r in rows]) for f in fields}
            summary[side][rk]["request_goodput_all"] = [r["request_goodput"] for r in rows]
            summary[side][rk]["p99_tpot_ms_all"] = [r["p99_tpot_ms"] for r in rows]
            summary[side][rk]["good_fraction"] = median_or_none(
                [r["good_requests"] / args.num_prompts for r in rows])
    ratios = {}
    for side in sides[1:]:
        ratios[side] = {}
        for rk in rks:
            v, e = summary["vanilla"][rk], summary[side][rk]
            div = lambda a, b: (a / b) if (a is not None and b) else None
            ratios[side][rk] = {"goodput": div(e["request_goodput"], v["request_goodput"]),
                                "throughput": div(e["request_throughput"], v["request_throughput"]),
                                "p50_tpot": div(e["p50_tpot_ms"], v["p50_tpot_ms"]),
                                "p99_tpot": div(e["p99_tpot_ms"], v["p99_tpot_ms"])}

    result = {
        "note": args.note, "machine": machine(), "model": f"SmolLM2-135M-Instruct {args.dtype}",
        "model_dir": model, "e3_artifact": artifact, "mode": "eager",
        "command": command, "servers": servers_cmd, "server_env": SERVER_ENV,
        "bench": "vllm bench serve (in-process main() of the CLI)" if not args.bench_cli
                 else "vllm bench serve (CLI)",
        "input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
        "seed": args.seed, "rates": rks, "repeats": args.repeats, "max_num_seqs": args.max_num_seqs,
        "sides": sides, "exits": EXITS, "profile": args.profile, "force_exit": PROFILES[args.profile],
        "slo": {"tpot_ms": slo_ms, "ttft_ms": args.slo_ttft_ms, "how": slo_how},
        "goodput_definition": "requests with (latency - ttft)/(output_len - 1) <= SLO, "
                              "divided by the benchmark duration (vLLM's request_goodput)",
        "unloaded_tpot_p50_ms": unloaded, "server_start_s": starts, "wall_s": wall,
        "summary": summary, "ratios_vs_vanilla": ratios, "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print()
    if args.note:
        print(f"NOTE: {args.note}")
    print(f"machine: {result['machine']}")
    print(f"model SmolLM2-135M-Instruct {args.dtype}, eager, max-num-seqs {args.max_num_seqs}; random "
          f"{args.input_len} in / {args.output_len} out, temperature 0, seed {args.seed}, "
          f"{args.num_prompts} prompts per rate, median of {args.repeats} interleaved repeat(s)")
    print(f"e3 sides: exits {EXITS}, profile {args.profile} {PROFILES[args.profile]}")
    print(f"TPOT SLO {slo_ms:g} ms ({slo_how}); unloaded TPOT p50: " +
          ", ".join(f"{s} {statistics.median(unloaded[s]):.1f} ms" for s in sides))
    print(f"command: {command}")
    hdr = f"{'rate':>5s} {'side':8s} {'goodput':>8s} {'ratio':>6s} {'good':>5s} {'thruput':>8s} " \
          f"{'ratio':>6s} {'TPOT p50':>9s} {'p99':>6s} {'ratio':>6s} {'TTFT p50':>9s} {'p99':>7s}"
    print(hdr)
    fmt = lambda x, spec: format(x, spec) if x is not None else "-"
    for rk in rks:
        for side in sides:
            s = summary[side][rk]
            q = ratios.get(side, {}).get(rk, {})
            print(f"{rk:>5s} {side:8s} {fmt(s['request_goodput'], '8.3f')} "
                  f"{fmt(q.get('goodput'), '6.2f') if side != 'vanilla' else '':>6s} "
                  f"{fmt(s['good_fraction'] * 100, '4.0f') + '%':>5s} "
                  f"{fmt(s['request_throughput'], '8.3f')} "
                  f"{fmt(q.get('throughput'), '6.2f') if side != 'vanilla' else '':>6s} "
                  f"{fmt(s['p50_tpot_ms'], '9.1f')} {fmt(s['p99_tpot_ms'], '6.1f')} "
                  f"{fmt(q.get('p99_tpot'), '6.2f') if side != 'vanilla' else '':>6s} "
                  f"{fmt(s['p50_ttft_ms'], '9.0f')} {fmt(s['p99_ttft_ms'], '7.0f')}")
    print("(goodput, throughput in req/s; ratio = e3 side / vanilla; good = share of requests within the SLO;"
          " times in ms)")
    for side in sides[1:]:
        e3s = [r["e3"] for r in runs if r["side"] == side and r["e3"]]
        if e3s:
            fr = median_or_none([x["layers_run_fraction"] for x in e3s])
            print(f"{side}: decoder layers run / full pass (median over runs): "
                  f"{fmt(fr, '.3f')}; exit shares of the last run: "
                  f"{ {k: round(v, 3) for k, v in e3s[-1]['exit_share'].items()} }")
    print(f"wall time {wall/60:.1f} min; wrote {args.out}")
    make_plot(result, plot)
    print(f"wrote {plot}")


def make_plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rks = result["rates"]
    finite = [float(r) for r in rks if r != "inf"]
    top = max(finite) if finite else 1.0
    x_inf = top * 1.3 if finite else 1.0
    xs = [float(r) if r != "inf" else x_inf for r in rks]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.6))
    style = {"vanilla": ("tab:gray", "o"), "token": ("tab:blue", "s"), "e3": ("tab:green", "^")}
    label = {"vanilla": "vanilla vLLM", "token": "--model-impl e3, policy token",
             "e3": "--model-impl e3, policy e3"}
    for side in result["sides"]:
        c, m = style[side]
        # vanilla hollow and larger: visible where the sides coincide
        mk = dict(marker=m, mfc="none", ms=10, mew=1.5) if side == "vanilla" else dict(marker=m, ms=6)
        s = result["summary"][side]
        for ax, key, allkey in ((a, "request_goodput", "request_goodput_all"),
                                (b, "p99_tpot_ms", "p99_tpot_ms_all")):
            ys = [s[r][key] for r in rks]
            err = [[y - min(s[r][allkey]) for y, r in zip(ys, rks)],
                   [max(s[r][allkey]) - y for y, r in zip(ys, rks)]]
            fin = [k for k, r in enumerate(rks) if r != "inf"]
            inf = [k for k, r in enumerate(rks) if r == "inf"]
            # finite rates joined by a line; "inf" (all at once) a lone point
            ax.errorbar([xs[k] for k in fin], [ys[k] for k in fin],
                        yerr=[[err[0][k] for k in fin], [err[1][k] for k in fin]],
                        color=c, capsize=3, label=label[side], **mk)
            if inf:
                ax.errorbar([xs[k] for k in inf], [ys[k] for k in inf],
                            yerr=[[err[0][k] for k in inf], [err[1][k] for k in inf]],
                            color=c, capsize=3, ls="none", **mk)
    if finite:
        a.plot([0, top], [0, top], ls=":", color="k", lw=0.8, label="offered rate")
    slo = result["slo"]["tpot_ms"]
    b.axhline(slo, ls="--", color="tab:red", lw=1, label=f"TPOT SLO {slo:g} ms")
    for ax, yl in ((a, f"goodput (req/s with TPOT ≤ {slo:g} ms)"), (b, "p99 TPOT (ms)")):
        ax.set_xticks(xs)
        ax.set_xticklabels(rks)
        ax.set_xlim(0, x_inf * 1.08)
        ax.set_ylim(bottom=0)
        if "inf" in rks and finite:
            ax.axvline((top + x_inf) / 2, color="k", lw=0.5, alpha=0.4)
        ax.set_xlabel("request rate (req/s, Poisson; inf = all at once)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    prof = ", ".join(f"{k}: {v}" for k, v in result["force_exit"].items())
    title = (f"vllm bench serve, SmolLM2-135M-Instruct {result['model'].split()[-1]}, eager, "
             f"random {result['input_len']} in / {result['output_len']} out, "
             f"{result['num_prompts']} prompts per rate, median of {result['repeats']} "
             f"(bars: min-max)\ne3: exits {result['exits']}, forced exit rates {{{prof}}}; "
             f"{result['machine']}")
    if result["note"]:
        title = f"[{result['note']}]\n" + title
    fig.suptitle(title, fontsize=8.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
