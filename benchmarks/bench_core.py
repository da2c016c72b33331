"""Benchmark: gated graph build and 160-step propagation, ours vs a fair naive dense version.

    python -m benchmarks.bench_core [--n 4096] [--d 1536] [--concepts 1 4 8] [--memory-n 4096 9216]
                                      [--interrupt-n 16384] [--json out.json]
    python -m benchmarks.bench_core --memory-only [--memory-n 4096] [--repeats 1] [--json out.json]   # the memory rows alone

Each measurement runs in a fresh subprocess, with CPU time (process) next to wall time.  Peak
memory is a reset high-water mark: on a CPU, after the inputs exist and a warm-up ran, the
kernel's peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs`, Linux) and the peak
extra memory is VmHWM minus the RSS at that moment, so nothing allocated before (inputs,
imports, warm-up) counts and nothing freed since can hide a peak.  Freed memory that the
allocator keeps would count (an over-estimate, never an under-estimate); the subprocesses run
with MALLOC_MMAP_THRESHOLD_=65536 so glibc keeps none of significant size.  That figure is the
resident memory under that setting: ComfyUI runs with glibc's default (dynamic) threshold, where
the same Build Gated Graph path peaked at 2.45-3.25 N^2 of resident memory over five runs at 4096
tokens (freed blocks the heap keeps).  Next to it, `tensor_peak_n2` counts live tensor storage
from torch's own operator calls (benchmarks/live_memory.py), which no C allocator setting changes.
On CUDA: torch.cuda.reset_peak_memory_stats / max_memory_allocated (the allocator's own count of
live tensors, so both figures are the same).  The unit "N^2" is one N x N float32.

Inputs: random softmax attention rows and Gaussian outputs.  The dense baseline is a direct
transcription (dense W_attn, gate, W, W_hat) whose propagation step is written (s^T W_hat)^T,
the fast form for a dense product with few columns (W_hat^T @ s with 4 columns hits a slow
BLAS path, 15x slower).  Both versions get the same inputs; their results are compared.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

import torch

from anchordiff_core.auto import PAPER_GATE_PERCENTILE, PAPER_STEPS

if not __package__:  # run as a file: its siblings (naive, live_memory) are imported relatively
    sys.exit("run this from the repository root as a module: python -m benchmarks.bench_core")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# glibc returns every block of 64 KB or more to the system when it is freed (no dynamic threshold),
# so RSS follows live memory instead of what the heap keeps after a free
MEASURE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def inputs(n, d, device, layers=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.stack([torch.softmax(torch.randn(n, n, generator=g).mul_(3), dim=1) for _ in range(layers)])
    o = torch.randn(layers, n, d, generator=g).add_(0.5)
    return a.to(device), o.to(device)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _status_kb(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))


class Peak:
    """Peak extra memory (bytes) of what runs between start() and stop(), from a reset high-water mark."""

    def __init__(self, device):
        self.device = device

    def start(self):
        sync(self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _status_kb("VmRSS") * 1024

    def stop(self):
        sync(self.device)
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kb("VmHWM") * 1024 - self.base


def timed(fn, device):
    sync(device)
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    return out, time.process_time() - c0, time.perf_counter() - w0


def node_maps(a, o):
    """AttentionMaps as a recording holds them: [B=1, G, N, N] / [B=1, G, N, D]."""
    from anchordiff_core.maps import AttentionMaps

    n = a.shape[-1]
    w = 1 << (int(n).bit_length() // 2)
    while n % w:
        w -= 1
    zeros = torch.zeros(1, 1, 1, n)
    return AttentionMaps(("x",), (n // w, w), (8 * n // w, 8 * w), zeros, zeros, a[None], o[None], tuple(range(a.shape[0])))


def measure(what, n, d, k, device, repeats):
    """Runs inside the subprocess; prints one JSON line."""
    from . import naive
    import anchordiff_core as ad
    from anchordiff_core import pipeline

    layers = 2 if what == "graph_node" else 1
    a, o = inputs(n, d, device, layers)
    a1, o1 = a[0], o[0]
    anchors = torch.arange(k, device=device) * (n // max(k, 1))
    small_a, small_o = inputs(256, 16, device, layers)  # warm up code paths on a small problem
    ad.propagate(ad.build_gated_graph(small_a, small_o), torch.tensor([0], device=device), 2)
    naive.dense_propagate(naive.dense_transition(small_a[0], small_o[0]), torch.tensor([0], device=device), 2)
    prepared = None
    if what == "propagate_ours":
        prepared = ad.build_gated_graph(a1, o1)
    elif what == "propagate_naive":
        prepared = naive.dense_transition(a1, o1)
    maps = node_maps(a, o) if what == "graph_node" else None
    runs = {
        "graph_ours": lambda: ad.build_gated_graph(a1, o1),
        "graph_node": lambda: pipeline.build_graphs(maps, PAPER_GATE_PERCENTILE, (), device, None, lambda: None),
        "graph_naive": lambda: naive.dense_transition(a1, o1),
        "propagate_ours": lambda: ad.propagate(prepared, anchors, PAPER_STEPS),
        "propagate_naive": lambda: naive.dense_propagate(prepared, anchors, PAPER_STEPS),
        "both_ours": lambda: ad.propagate(ad.build_gated_graph(a1, o1), anchors, PAPER_STEPS),
    }
    peak = Peak(device)
    best = None
    for _ in range(repeats):
        peak.start()
        out, cpu, wall = timed(runs[what], device)
        used = peak.stop()
        best = {"cpu_s": cpu, "wall_s": wall, "peak_bytes": used} if best is None or wall < best["wall_s"] else best
        best["peak_bytes"] = max(best["peak_bytes"], used)
        del out
    result = {"what": what, "n": n, "d": d, "k": k, **best, "peak_n2": best["peak_bytes"] / (4 * n * n)}
    if what.startswith("graph_"):  # live tensor memory, whatever the C allocator keeps resident
        if device == "cuda":
            result["tensor_peak_bytes"] = best["peak_bytes"]  # the CUDA allocator's own count already
        else:
            from .live_memory import LiveTensorPeak

            with LiveTensorPeak() as live:
                out = runs[what]()
            del out
            result["tensor_peak_bytes"] = live.peak
        result["tensor_peak_n2"] = result["tensor_peak_bytes"] / (4 * n * n)
    if what.startswith("propagate") or what == "both_ours":
        result["heat"] = runs[what]().cpu().tolist()
    print(json.dumps(result))


def interrupt_latency(n, d, device):
    """Build Gated Graph's own path (pipeline.build_graphs on a 2-layer recording, the nodes'
    default gate) at n tokens, twice.  First a whole build with every interrupt check time-stamped:
    the largest gap between two checks, the start and the end of the build included, bounds how
    long a stop request can wait at any point of the build.  Then a build asked to stop 3 s in:
    the seconds until it raised."""
    from anchordiff_core import pipeline

    a, o = inputs(n, d, device, layers=2)
    maps = node_maps(a, o)
    del a, o
    stamps = []
    t0 = time.perf_counter()
    pipeline.build_graphs(maps, "auto", (), device, None, lambda: stamps.append(time.perf_counter()))
    end = time.perf_counter()
    stamps = [t0] + stamps + [end]
    gaps = [b - c for c, b in zip(stamps, stamps[1:])]
    requested = threading.Event()

    class Stop(Exception):
        pass

    def check():
        if requested.is_set():
            raise Stop

    timer = threading.Timer(3.0, requested.set)
    t1 = time.perf_counter()
    timer.start()
    try:
        pipeline.build_graphs(maps, "auto", (), device, None, check)
        stopped = None
    except Stop:
        stopped = time.perf_counter() - (t1 + 3.0)
    print(json.dumps({"what": "interrupt", "n": n, "layers": 2, "build_wall_s": end - t0, "checks": len(stamps) - 2,
                      "max_gap_s": max(gaps), "latency_s": stopped}))


def run(what, args, k, n=None):
    cmd = [sys.executable, "-m", __spec__.name, "--inner", what, "--n", str(n or args.n[0]), "--d", str(args.d),
           "--device", args.device, "--repeats", str(args.repeats), "--concepts", str(k)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=MEASURE_ENV, cwd=ROOT)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def timings(args, report) -> None:
    """The timing rows: Build Gated Graph and Propagate, ours against the dense transcription."""
    report["graph"], report["propagate"] = {}, []
    print(f"{'step':<26}{'ours CPU-s / wall':>20}{'dense CPU-s / wall':>22}{'speed-up (wall)':>17}")
    g_ours, g_naive = run("graph_ours", args, 1), run("graph_naive", args, 1)
    report["graph"] = {"ours": g_ours, "naive": g_naive}
    print(f"{'build_gated_graph':<26}{g_ours['cpu_s']:>10.2f} / {g_ours['wall_s']:<7.2f}{g_naive['cpu_s']:>12.2f} / {g_naive['wall_s']:<7.2f}"
          f"{g_naive['wall_s'] / g_ours['wall_s']:>8.1f}x")
    for k in args.concepts:
        ours, naive_ = run("propagate_ours", args, k), run("propagate_naive", args, k)
        diff = max(abs(x - y) for ro, rn in zip(ours.pop("heat"), naive_.pop("heat")) for x, y in zip(ro, rn))
        both = run("both_ours", args, k)
        both.pop("heat")
        report["propagate"].append({"k": k, "ours": ours, "naive": naive_, "both": both, "max_diff": diff})
        print(f"{f'propagate({PAPER_STEPS}), K={k}':<26}{ours['cpu_s'] * 1e3:>8.0f}ms / {ours['wall_s'] * 1e3:<5.0f}ms"
              f"{naive_['cpu_s'] * 1e3:>9.0f}ms / {naive_['wall_s'] * 1e3:<6.0f}ms{naive_['wall_s'] / ours['wall_s']:>7.1f}x"
              f"   max |diff| {diff:.1e}; graph + propagate {both['wall_s']:.2f} s wall")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[4096])
    p.add_argument("--d", type=int, default=1536)
    p.add_argument("--concepts", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--memory-n", type=int, nargs="*", default=[4096, 9216])
    p.add_argument("--interrupt-n", type=int, default=16384, help="0 = skip")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory rows (--memory-n): no timings, no interrupt check")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.inner == "interrupt":
        interrupt_latency(args.n[0], args.d, args.device)
        return
    if args.inner:
        measure(args.inner, args.n[0], args.d, args.concepts[0], args.device, args.repeats)
        return
    n = args.n[0]
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"AnchorDiff core benchmark: N={n}, D={args.d}, device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    report = {"device": name, "n": n, "d": args.d, "threads": torch.get_num_threads()}
    if not args.memory_only:
        timings(args, report)
    report["memory"] = []
    for m in args.memory_n:
        row = {"n": m, "core": run("graph_ours", args, 1, m), "node": run("graph_node", args, 1, m)}
        report["memory"].append(row)
        print(f"peak extra memory at N={m}: build_gated_graph {row['core']['peak_n2']:.2f} N^2 "
              f"({row['core']['peak_bytes'] / 2**20:.0f} MB), through Build Gated Graph (2 layers) "
              f"{row['node']['peak_n2']:.2f} N^2 ({row['node']['peak_bytes'] / 2**20:.0f} MB); live tensors (allocator-independent) "
              f"{row['core']['tensor_peak_n2']:.2f} / {row['node']['tensor_peak_n2']:.2f} N^2; "
              f"{row['core']['cpu_s']:.1f} CPU-s / {row['core']['wall_s']:.1f} s wall")
    if args.interrupt_n and not args.memory_only:
        cmd = [sys.executable, "-m", __spec__.name, "--inner", "interrupt", "--n", str(args.interrupt_n), "--d", str(args.d), "--device", args.device]
        report["interrupt"] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip().splitlines()[-1])
        r = report["interrupt"]
        print(f"interrupt at N={r['n']} (Build Gated Graph's path, 2 layers): a whole build {r['build_wall_s']:.1f} s wall, "
              f"{r['checks']} checks, largest gap (start and end included) {r['max_gap_s']:.2f} s; "
              f"asked to stop 3 s in, raised {r['latency_s']:.2f} s later")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
