"""The tables of docs/scaling.md: `vllm_e3.layout.compare` on the recorded
SmolLM2-135M curves (benchmarks/results/curves_smollm2_135m_fp32.json) and on
them scaled to a Llama-2-7B shape, for N = 2, 4, 8. Pure arithmetic, no engine:

    .venv/bin/python benchmarks/layout_tables.py [--batch 64] [--hop-cost 1] [--hop-latency 50] [--full]
"""
import argparse
import json
import os

from vllm_e3.layout import LLAMA_7B, SMOLLM2_135M, compare, normalise_costs, scale_costs, scale_profile

HERE = os.path.dirname(os.path.abspath(__file__))
MIDDLE = {8: 0.3, 15: 0.7 * 0.357, 22: 0.7 * 0.643 * 0.444}   # force_exit {8: .3, 15: .357, 22: .444}


def measured_profile():
    """The deployed calibration row's held-out exit fractions (0.99 agreement, gate)."""
    raw = json.load(open(os.path.join(HERE, "..", "artifacts", "smollm2-135m", "e3", "calibration.json")))
    row = next(r["chosen"] for r in raw["table"] if r["target_agreement"] == 0.99)
    return dict(zip(raw["exits"], row["verify"]["exit_fraction"]))


def row(name, r):
    if r is None:
        return f"| {name} | none within the bound | | | |"
    lay = r["layout"]
    return (f"| {name} | {list(lay.boundaries) or '-'} | {list(lay.replicas)} | {list(lay.exits) or '-'} "
            f"| {r['throughput']:,.0f} | {r['vs_dp']:.3f} | {1e3 * r['tpot_p99_s']:.1f} ({r['p99_vs_vanilla']:.2f}x) |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hop-cost", type=float, default=1.0, help="us per token per hop")
    ap.add_argument("--hop-latency", type=float, default=50.0, help="us per hop")
    ap.add_argument("--bound", type=float, default=2.0)
    ap.add_argument("--full", action="store_true", help="one row per layout, with p99 and layouts")
    a = ap.parse_args()
    small = normalise_costs(json.load(open(os.path.join(HERE, "results", "curves_smollm2_135m_fp32.json"))))
    big = scale_costs(small, SMOLLM2_135M, LLAMA_7B)
    cases = [("SmolLM2-135M, middle profile (forced)", small, MIDDLE, "forced"),
             ("SmolLM2-135M, measured profile (gate, 0.99 row)", small, measured_profile(), "gate"),
             ("Llama-7B-scaled, middle profile (forced)", big, scale_profile(MIDDLE, 30, 32), "forced"),
             ("Llama-7B-scaled, measured profile (gate)", big, scale_profile(measured_profile(), 30, 32), "gate")]
    for title, costs, prof, measure in cases:
        print(f"\n**{title}**, exits {{{', '.join(f'{e}: {x:.4g}' for e, x in prof.items())}}}, "
              f"batch {a.batch} per device\n")
        if a.full:
            print("| N | layout | boundaries | replicas | exits | tok/s | vs DP | p99 TPOT ms (x vanilla) |")
            print("|---|---|---|---|---|---|---|---|")
        else:
            print("| N | DP tok/s | DP + exits | uniform PP | uniform PP + exits | E3 layout "
                  "(boundaries x replicas, exits) | **E3** | E3 p99 / vanilla | E3 as vLLM DP x PP |")
            print("|---|---|---|---|---|---|---|---|---|")
        for n in (2, 4, 8):
            res = compare(costs, sorted(prof), prof, n, a.batch, measure, a.hop_cost * 1e-6,
                          a.hop_latency * 1e-6, a.bound)
            if not a.full:
                e3 = res["e3"]
                lay = e3["layout"]
                print(f"| {n} | {res['dp']['throughput']:,.1f} | {res['dp_exits']['vs_dp']:.3f}x "
                      f"| {res['pp']['vs_dp']:.3f}x | {res['pp_exits']['vs_dp']:.3f}x "
                      f"| {list(lay.boundaries)} x {list(lay.replicas)}, {list(lay.exits)} "
                      f"| **{e3['vs_dp']:.3f}x** | {e3['p99_vs_vanilla']:.2f} "
                      f"| {res['e3_dp_pp']['vs_dp']:.3f}x |")
                continue
            for name, label in (("dp", "DP"), ("dp_exits", "DP + exits"), ("pp", "uniform PP"),
                                ("pp_exits", "uniform PP + exits"), ("e3", "**E3**"),
                                ("e3_dp_pp", "E3 as vLLM DP x PP")):
                print(f"| {n} " + row(label, res[name]))

if __name__ == "__main__":
    main()
