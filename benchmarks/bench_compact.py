"""Benchmark compact (prefix sum + gather of hidden, residual, positions): torch vs Triton.

Bytes moved per call (the roofline): hidden and residual read and written in full
(the output is a stable partition of all n rows), positions read and written, the
keep mask read and the index arrays (keep_idx, dest) written:
    4 * n * d * elt + 16 * n + n + 16 * n
At decode sizes this is launch-bound on a GPU; the figures say by how much.

    python benchmarks/bench_compact.py                                  # CPU (torch only)
    python benchmarks/bench_compact.py --device cuda --check --json out.json
"""
from __future__ import annotations

import argparse
import json

import torch

from bench_exit_confidence import machine, measure_ceilings, time_ms
from vllm_e3.kernels import compact_ref, compact_triton

FIELDS = ("num_keep", "keep_idx", "dest", "hidden", "residual", "positions")


def _inputs(n, d, dtype, device, g, strided=False):
    keep = torch.rand(n, generator=g, device=device) < 0.6
    width = d + 8 if strided else d
    hidden = torch.randn(n, width, generator=g, device=device).to(dtype)[:, :d]
    residual = torch.randn(n, width, generator=g, device=device).to(dtype)[:, :d]
    positions = torch.randint(0, 1 << 16, (n,), generator=g, device=device)
    return keep, hidden, residual, positions


def bytes_moved(n, d, elt):
    return 4 * n * d * elt + 16 * n + n + 16 * n


def check_cuda(device) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    results = []
    for n, d, dtype, strided in [(1, 64, torch.float32, False), (83, 769, torch.bfloat16, True),
                                 (256, 4096, torch.bfloat16, False), (5000, 576, torch.bfloat16, True)]:
        args = _inputs(n, d, dtype, device, g, strided)
        got, ref = compact_triton(*args), compact_ref(*args)
        ok = all(torch.equal(getattr(got, f), getattr(ref, f)) for f in FIELDS)
        results.append({"check": f"compact n={n} d={d} {dtype}{' strided' if strided else ''}", "ok": ok})
        print(("PASS " if ok else "FAIL ") + json.dumps(results[-1]))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--n", type=int, nargs="*")
    ap.add_argument("--reps", type=int, default=20, help="CPU timing repetitions (median)")
    ap.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's choice)")
    ap.add_argument("--check", action="store_true", help="CUDA: check Triton against the reference first")
    ap.add_argument("--json")
    args = ap.parse_args()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    device = torch.device("cuda" if use_cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    d, dtype, elt = (4096, torch.bfloat16, 2) if use_cuda else (576, torch.bfloat16, 2)
    out = {"machine": machine(device)}
    if use_cuda and args.check:
        out["checks"] = check_cuda(device)
    ceil = measure_ceilings(device) if use_cuda else None
    out["ceilings"] = ceil
    print(f"# compact | {machine(device)}" + (f" | HBM ceiling {ceil['hbm_GBps']:.0f} GB/s (4 GiB copy)" if ceil else ""))
    print(f"# shape: d={d}, {dtype}, keep ~60% of rows; bytes = 4*n*d*elt + 33n")
    print(f"{'n':>6} {'provider':<8} {'ms':>9} {'GB/s':>8}" + (f" {'%roof':>6}" if ceil else ""))
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for n in args.n or ((16, 256, 4096) if use_cuda else (16, 64, 256)):
        inputs = _inputs(n, d, dtype, device, g)
        providers = [("torch", lambda: compact_ref(*inputs))]
        if use_cuda:
            providers.append(("triton", lambda: compact_triton(*inputs)))
        for name, fn in providers:
            ms = time_ms(fn, device, args.reps)
            gbps = bytes_moved(n, d, elt) / ms / 1e6
            row = {"n": n, "d": d, "dtype": "bf16", "provider": name, "ms": round(ms, 4), "GBps": round(gbps, 1)}
            line = f"{n:>6} {name:<8} {ms:>9.4f} {gbps:>8.1f}"
            if ceil:
                row["pct_roofline"] = round(100 * gbps / ceil["hbm_GBps"], 2)
                line += f" {row['pct_roofline']:>5.1f}%"
            rows.append(row)
            print(line)
    out["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if any(not c["ok"] for c in out.get("checks", [])):
        raise SystemExit("correctness check failed")


if __name__ == "__main__":
    main()
