"""Benchmark: gated graph build and 160-step propagation, ours vs the naive dense version.

    python benchmarks/bench_core.py [--n 4096] [--d 1536] [--concepts 1 4 8] [--device cpu|cuda]

Each measurement runs in a fresh subprocess so peak memory is its own: peak RSS growth on CPU
(getrusage), torch.cuda.max_memory_allocated on CUDA.  Inputs are random softmax attention rows
and Gaussian outputs; both versions get the same inputs and their results are compared.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def inputs(n, d, device):
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(n, n, generator=g) * 3, dim=1)
    o = torch.randn(n, d, generator=g) + 0.5
    return a.to(device), o.to(device)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mb(device, rss_before_kb):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kb) / 1024


def measure(what, n, d, k, device, repeats):
    """Runs inside the subprocess; prints one JSON line."""
    import naive
    import anchordiff_core as ad

    a, o = inputs(n, d, device)
    anchors = torch.arange(k, device=device) * (n // max(k, 1))
    # warm up code paths on a small problem, so the peak below is this problem's
    small_a, small_o = inputs(256, 16, device)
    ad.propagate(ad.build_gated_graph(small_a, small_o), torch.tensor([0], device=device), 2)
    naive.dense_propagate(naive.dense_transition(small_a, small_o), torch.tensor([0], device=device), 2)
    prepared = None
    if what == "propagate_ours":
        prepared = ad.build_gated_graph(a, o)
    elif what == "propagate_naive":
        prepared = naive.dense_transition(a, o)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if what == "graph_ours":
            out = ad.build_gated_graph(a, o)
        elif what == "graph_naive":
            out = naive.dense_transition(a, o)
        elif what == "propagate_ours":
            out = ad.propagate(prepared, anchors, 160)
        elif what == "propagate_naive":
            out = naive.dense_propagate(prepared, anchors, 160)
        elif what == "both_ours":
            out = ad.propagate(ad.build_gated_graph(a, o), anchors, 160)
        sync(device)
        times.append(time.perf_counter() - t0)
        del out
    peak = peak_mb(device, rss) - (base if device == "cuda" else 0)
    result = {"what": what, "k": k, "seconds": min(times), "peak_mb": peak}
    if what.startswith("propagate") or what == "both_ours":
        result["heat"] = (ad.propagate(prepared, anchors, 160) if what == "propagate_ours" else
                          naive.dense_propagate(prepared, anchors, 160) if what == "propagate_naive" else
                          ad.propagate(ad.build_gated_graph(a, o), anchors, 160)).cpu().tolist()
    print(json.dumps(result))


def run(what, args, k):
    cmd = [sys.executable, __file__, "--inner", what, "--n", str(args.n), "--d", str(args.d),
           "--device", args.device, "--repeats", str(args.repeats), "--concepts", str(k)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=1536)
    p.add_argument("--concepts", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner", default=None)
    args = p.parse_args()
    if args.inner:
        measure(args.inner, args.n, args.d, args.concepts[0], args.device, args.repeats)
        return
    n2_mb = args.n * args.n * 4 / 2**20
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"AnchorDiff core benchmark: N={args.n}, D={args.d}, device {name}, torch {torch.__version__}")
    print(f"one N x N float32 buffer = {n2_mb:.0f} MB\n")
    g_ours, g_naive = run("graph_ours", args, 1), run("graph_naive", args, 1)
    print(f"{'step':<28}{'ours':>12}{'naive dense':>14}{'speed-up':>10}{'peak ours':>12}{'peak naive':>12}")
    print(f"{'build_gated_graph':<28}{g_ours['seconds'] * 1e3:>10.1f}ms{g_naive['seconds'] * 1e3:>12.1f}ms"
          f"{g_naive['seconds'] / g_ours['seconds']:>9.1f}x{g_ours['peak_mb']:>10.0f}MB{g_naive['peak_mb']:>10.0f}MB"
          f"   (= {g_ours['peak_mb'] / n2_mb:.2f} vs {g_naive['peak_mb'] / n2_mb:.2f} N^2 buffers)")
    for k in args.concepts:
        ours, naive_ = run("propagate_ours", args, k), run("propagate_naive", args, k)
        diff = max(abs(x - y) for ro, rn in zip(ours["heat"], naive_["heat"]) for x, y in zip(ro, rn))
        both = run("both_ours", args, k)
        print(f"{f'propagate(160), K={k}':<28}{ours['seconds'] * 1e3:>10.1f}ms{naive_['seconds'] * 1e3:>12.1f}ms"
              f"{naive_['seconds'] / ours['seconds']:>9.1f}x{ours['peak_mb']:>10.0f}MB{naive_['peak_mb']:>10.0f}MB"
              f"   max |diff| {diff:.1e}; graph + propagate {both['seconds'] * 1e3:.1f}ms")


if __name__ == "__main__":
    main()
