"""Benchmark exit_confidence and gate_confidence: torch path and Triton side by side.

CPU (the default without CUDA): the cost of one exit decision on the torch path, for
each confidence measure (max_prob, margin, gate), at the embedded model's shape
(SmolLM2-135M: d=576, V=49152, bf16) for n in {16, 64, 256}, relative to one decoder
layer of that model emulated with torch bf16 matmuls (d=576, intermediate 1536,
9 heads / 3 KV heads, head_dim 64; norms and SiLU included, the attention core not).
Triton is not timed on the CPU (its interpreter is for correctness only).

CUDA (`--device cuda`): torch vs Triton at d=4096, V=128256, bf16, n in {16, 256},
with GB/s and % of roofline against ceilings measured in the same run (HBM bandwidth
from a large copy, bf16 tensor-core rate from a large matmul), a correctness check
against the fp32 reference first (`--check`) and a small tile sweep (`--sweep`).

    python benchmarks/bench_exit_confidence.py                     # CPU figures
    python benchmarks/bench_exit_confidence.py --device cuda --check --sweep --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from vllm_e3.kernels import (
    HAS_TRITON,
    confidence_from_logits,
    exit_confidence_ref,
    exit_confidence_torch,
    exit_confidence_triton,
    gate_confidence_ref,
    gate_confidence_triton,
)

# ---------------------------------------------------------------------------------------
# Shared helpers (bench_compact.py imports these)
# ---------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), load avg {load:.1f}")


def time_ms(fn, device: torch.device, reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in ms (CUDA: triton's do_bench, median, L2 flushed)."""
    if device.type == "cuda":
        if HAS_TRITON:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: torch.device) -> dict:
    """HBM GB/s from a 4 GiB copy (read + write) and bf16 TFLOP/s from 8192^3 matmuls."""
    src = torch.empty(1 << 31, dtype=torch.bfloat16, device=device)  # 4 GiB
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    hbm_gbps = 2 * src.numel() * 2 / copy_ms / 1e6
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_ms = time_ms(lambda: a @ b, device)
    bf16_tflops = 2 * 8192**3 / mm_ms / 1e9
    return {"hbm_GBps": hbm_gbps, "bf16_TFLOPs": bf16_tflops, "copy_ms": copy_ms, "matmul_ms": mm_ms}


def roofline_ms(bytes_moved: float, flops: float, ceil: dict) -> float:
    return max(bytes_moved / (ceil["hbm_GBps"] * 1e6), flops / (ceil["bf16_TFLOPs"] * 1e9))


# ---------------------------------------------------------------------------------------
# CPU: the torch path at the embedded model's shape, against one emulated decoder layer
# ---------------------------------------------------------------------------------------


class EmulatedLlamaLayer:
    """One Llama decoder layer's matmuls in torch (no attention core): RMSNorm ->
    qkv [d -> (H + 2 KV) * hd] -> o [H * hd -> d] -> RMSNorm -> gate_up [d -> 2I] ->
    SiLU * up -> down [I -> d]. Weights [out, in] as in vLLM, used via F.linear."""

    def __init__(self, d=576, inter=1536, heads=9, kv_heads=3, head_dim=64, dtype=torch.bfloat16):
        g = torch.Generator().manual_seed(0)

        def w(out_f, in_f):
            return (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(dtype)

        self.qkv = w((heads + 2 * kv_heads) * head_dim, d)
        self.o = w(d, heads * head_dim)
        self.gate_up = w(2 * inter, d)
        self.down = w(d, inter)
        self.q_size, self.inter = heads * head_dim, inter
        self.norm1 = torch.ones(d, dtype=dtype)
        self.norm2 = torch.ones(d, dtype=dtype)

    def __call__(self, hidden, residual):  # [n, d], [n, d]
        residual = hidden + residual
        h = F.rms_norm(residual, (residual.shape[-1],), self.norm1, 1e-5)
        q = F.linear(h, self.qkv)[:, : self.q_size]  # the attention core would read K/V here
        residual = F.linear(q, self.o) + residual
        h = F.rms_norm(residual, (residual.shape[-1],), self.norm2, 1e-5)
        gate, up = F.linear(h, self.gate_up).split(self.inter, dim=-1)
        return F.linear(F.silu(gate) * up, self.down), residual


def bench_cpu(args) -> list[dict]:
    device = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    d, V, dtype = 576, 49152, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(V, d, generator=g) * 0.05).to(dtype)
    weight_fp32 = weight.float()  # the option of caching an fp32 head copy (113 MB)
    gate_w, gate_b = (torch.randn(d, generator=g) * 0.05).to(dtype), torch.zeros(1, dtype=dtype)
    layer = EmulatedLlamaLayer()
    print(f"# exit_confidence, CPU torch path | {machine(device)}")
    print(f"# shape: d={d}, V={V}, hidden/head {dtype}; decoder layer = torch bf16 emulation "
          "(d=576, I=1536, 9 heads / 3 KV, hd 64; matmuls + norms + SiLU, no attention core)")
    print(f"# median of {args.reps} interleaved rounds (every provider once per round, so a load "
          "change hits all alike); vs_layer = exit decision / one emulated layer at the same n")
    print(f"{'n':>5} {'provider':<42} {'ms':>9} {'vs_layer':>9}")
    rows = []
    for n in args.n or (16, 64, 256):
        hidden = torch.randn(n, d, generator=g).to(dtype)
        residual = torch.randn(n, d, generator=g).to(dtype)
        threshold = torch.full((n,), 0.5)
        logits = hidden @ weight.T  # [n, V] bf16, for the statistics-only rows
        cases = {
            "decoder layer (emulated, bf16)": lambda: layer(hidden, residual),
            "max_prob, bf16 head": lambda: exit_confidence_torch(hidden, weight, threshold, "max_prob"),
            "margin, bf16 head": lambda: exit_confidence_torch(hidden, weight, threshold, "margin"),
            "max_prob, cached fp32 head": lambda: exit_confidence_torch(hidden, weight_fp32, threshold),
            "max_prob, stats only (bf16 logits given)": lambda: confidence_from_logits(logits, threshold),
            "margin, stats only (bf16 logits given)": lambda: confidence_from_logits(logits, threshold, "margin"),
            "gate": lambda: gate_confidence_ref(hidden, gate_w, gate_b, threshold),
        }
        times = {name: [] for name in cases}
        for _ in range(args.reps):
            for name, fn in cases.items():
                times[name].append(time_ms(fn, device, reps=1, warmup=0 if times[name] else 1))
        layer_ms = statistics.median(times["decoder layer (emulated, bf16)"])
        for name in cases:
            ms = statistics.median(times[name])
            rows.append({"device": "cpu", "n": n, "d": d, "V": V, "dtype": "bf16", "provider": name,
                         "ms": round(ms, 3), "vs_layer": round(ms / layer_ms, 3)})
            print(f"{n:>5} {name:<42} {ms:>9.3f} {ms / layer_ms:>8.2f}x")
    print(f"# after: {machine(device)}")
    return rows


# ---------------------------------------------------------------------------------------
# CUDA: torch vs Triton, GB/s and % of roofline
# ---------------------------------------------------------------------------------------

SWEEP = {  # (block_n, block_v, block_k, num_warps, num_stages, splits_per_sm)
    16: [(16, 128, 128, 4, 4, 2), (16, 64, 256, 4, 3, 2), (16, 128, 64, 4, 6, 4),
         (16, 256, 64, 8, 4, 2), (16, 128, 128, 4, 4, 4)],
    256: [(128, 128, 64, 8, 3, 1), (64, 128, 64, 4, 4, 2), (128, 256, 64, 8, 3, 1),
          (256, 128, 64, 8, 3, 1), (128, 128, 128, 8, 3, 1), (64, 256, 64, 8, 3, 1)],
}


def check_cuda(device: torch.device) -> list[dict]:
    """Triton vs the fp32 reference on awkward shapes, strided views and exact ties."""
    results = []
    g = torch.Generator(device=device).manual_seed(0)
    for n, d, V, dtype, measure, strided in [
        (7, 769, 5003, torch.bfloat16, "margin", True),
        (83, 576, 49152, torch.bfloat16, "max_prob", False),
        (1, 64, 50257, torch.float32, "margin", False),
        (16, 4096, 128256, torch.bfloat16, "max_prob", False),
        (256, 4096, 128256, torch.bfloat16, "margin", False),
    ]:
        hidden = torch.randn(n, d + 8 if strided else d, generator=g, device=device).to(dtype)[:, :d]
        weight = (torch.randn(V, d, generator=g, device=device) * 0.05).to(dtype)
        threshold = torch.rand(n, generator=g, device=device) * 0.5
        got = exit_confidence_triton(hidden, weight, threshold, measure)
        ref = exit_confidence_ref(hidden, weight, threshold, measure)
        logits = hidden.float() @ weight.float().T
        picked = logits.gather(1, got.argmax[:, None]).squeeze(1)
        err = (got.confidence - ref.confidence).abs().max().item()
        ok = err < 2e-4 and bool((logits.max(1).values - picked <= 1e-3).all())
        results.append({"check": f"exit_confidence n={n} d={d} V={V} {dtype} {measure}"
                        f"{' strided' if strided else ''}", "max_abs_err": err,
                        "argmax_equal": float((got.argmax == ref.argmax).float().mean()), "ok": ok})
    # Exact ties across tiles and splits: integer-valued logits, tied at 1234, 4000, 4999.
    hidden = torch.randint(-2, 3, (4, 64), generator=g, device=device).float()
    weight = torch.randint(-1, 2, (5003, 64), generator=g, device=device).float() / 4
    weight[[1234, 4000, 4999]] = hidden[0].sign() / 2
    for dtype in (torch.float32, torch.bfloat16):
        got = exit_confidence_triton(hidden.to(dtype), weight.to(dtype), torch.zeros(4, device=device))
        ok = int(got.argmax[0]) == 1234
        results.append({"check": f"ties {dtype}", "argmax0": int(got.argmax[0]), "ok": ok})
    for r in results:
        print(("PASS " if r["ok"] else "FAIL ") + json.dumps(r))
    return results


def bench_cuda(args) -> dict:
    device = torch.device("cuda")
    d, V, dtype = 4096, 128256, torch.bfloat16
    out = {"machine": machine(device)}
    if args.check:
        out["checks"] = check_cuda(device)
    ceil = measure_ceilings(device)
    out["ceilings"] = ceil
    print(f"# exit_confidence | {machine(device)} | ceilings: HBM {ceil['hbm_GBps']:.0f} GB/s (4 GiB copy), "
          f"bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s (8192^3 matmul)")
    print(f"# shape: d={d}, V={V}, {dtype}; roofline = max(bytes/HBM, 2nVd/bf16 MMA) from the ceilings above")
    print(f"{'n':>5} {'provider':<40} {'ms':>8} {'GB/s':>8} {'TFLOP/s':>8} {'%roof':>6}")
    g = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(V, d, generator=g, device=device) * 0.05).to(dtype)
    rows = []
    for n in args.n or (16, 256):
        hidden = torch.randn(n, d, generator=g, device=device).to(dtype)
        threshold = torch.full((n,), 0.5, device=device)
        bytes_moved = V * d * 2 + n * d * 2 + n * 17
        flops = 2 * n * V * d
        roof = roofline_ms(bytes_moved, flops, ceil)
        providers = [("torch (bf16 logits + fp32 stats)",
                      lambda: exit_confidence_torch(hidden, weight, threshold, "max_prob")),
                     ("triton default, max_prob",
                      lambda: exit_confidence_triton(hidden, weight, threshold, "max_prob")),
                     ("triton default, margin",
                      lambda: exit_confidence_triton(hidden, weight, threshold, "margin"))]
        if args.sweep:
            for bn, bv, bk, nw, ns, sps in SWEEP.get(n, []):
                cfg = dict(block_n=bn, block_v=bv, block_k=bk, num_warps=nw, num_stages=ns, splits_per_sm=sps)
                providers.append((f"triton {bn}x{bv}x{bk} w{nw} s{ns} sps{sps}",
                                  lambda cfg=cfg: exit_confidence_triton(hidden, weight, threshold, **cfg)))
        for name, fn in providers:
            try:
                ms = time_ms(fn, device)
            except Exception as e:  # a sweep config that does not fit (shared memory, registers)
                print(f"{n:>5} {name:<40} failed: {type(e).__name__}: {str(e)[:80]}")
                continue
            row = {"n": n, "d": d, "V": V, "dtype": "bf16", "provider": name, "ms": round(ms, 4),
                   "GBps": round(bytes_moved / ms / 1e6, 1), "TFLOPs": round(flops / ms / 1e9, 1),
                   "pct_roofline": round(100 * roof / ms, 1), "roofline_ms": round(roof, 4)}
            rows.append(row)
            print(f"{n:>5} {name:<40} {ms:>8.4f} {row['GBps']:>8.0f} {row['TFLOPs']:>8.1f} {row['pct_roofline']:>5.1f}%")
        # gate: bytes-bound (n*d + d in, 5 bytes per row out)
        gw, gb = torch.randn(d, device=device, dtype=dtype) * 0.05, torch.zeros(1, device=device, dtype=dtype)
        gate_bytes = n * d * 2 + d * 2 + n * 9
        gate_roof = gate_bytes / (ceil["hbm_GBps"] * 1e6)
        for name, fn in [("gate torch", lambda: gate_confidence_ref(hidden, gw, gb, threshold)),
                         ("gate triton", lambda: gate_confidence_triton(hidden, gw, gb, threshold))]:
            ms = time_ms(fn, device)
            rows.append({"n": n, "d": d, "dtype": "bf16", "provider": name, "ms": round(ms, 4),
                         "GBps": round(gate_bytes / ms / 1e6, 1), "pct_roofline": round(100 * gate_roof / ms, 2)})
            print(f"{n:>5} {name:<40} {ms:>8.4f} {gate_bytes / ms / 1e6:>8.0f} {'':>8} {100 * gate_roof / ms:>5.1f}%"
                  " (launch-bound)")
    out["rows"] = rows
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--n", type=int, nargs="*", help="token counts (default: 16 64 256 on CPU, 16 256 on CUDA)")
    ap.add_argument("--reps", type=int, default=5, help="CPU timing repetitions (median)")
    ap.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's choice)")
    ap.add_argument("--check", action="store_true", help="CUDA: check Triton against the reference first")
    ap.add_argument("--sweep", action="store_true", help="CUDA: also time a few tile configurations")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    result = bench_cuda(args) if use_cuda else {"machine": machine(torch.device("cpu")), "rows": bench_cpu(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if any(not c["ok"] for c in result.get("checks", [])):
        raise SystemExit("correctness check failed")


if __name__ == "__main__":
    main()
