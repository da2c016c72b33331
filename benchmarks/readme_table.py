"""Regenerate the performance tables (docs/PERFORMANCE.md; the README summarises them) from the benchmarks' JSON results.

    python -m benchmarks.readme_table --run          # runs bench_core, bench_capture --full (long) and gpu_estimate, then writes
    python -m benchmarks.readme_table CORE.json FULL.json [--large LARGE.json] [--gpu GPU.json]   # from saved results

--large (repeatable): bench_capture.py --full NAME --blocks ... (depth-reduced; --run makes LARGE_RUNS: SD3.5 Large
with 4 blocks, Flux.1 dev with 2 double + 2 single blocks with each anchor_maps setting).
--gpu: gpu_estimate.py --json (a roofline count, not a measurement; said so in the table).

Replaces the text between the markers <!-- bench:begin --> and <!-- bench:end --> in docs/PERFORMANCE.md.
"""
import argparse
import json
import os
import subprocess
import sys

from anchordiff_core.auto import PAPER_STEPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def core_rows(core):
    g, n = core["graph"], core["n"]
    lines = [
        f"| at {n} tokens (1024 x 1024), {core['device']}, {core['threads']} thread(s) | ours: CPU / wall | naive dense: CPU / wall |",
        "|---|---|---|",
        f"| Build Gated Graph | {g['ours']['cpu_s']:.2f} / {g['ours']['wall_s']:.2f} s | {g['naive']['cpu_s']:.2f} / {g['naive']['wall_s']:.2f} s |",
    ]
    for row in core["propagate"]:
        o, d = row["ours"], row["naive"]
        lines.append(f"| Propagate ({PAPER_STEPS} steps), K = {row['k']} | {o['cpu_s'] * 1e3:.0f} / {o['wall_s'] * 1e3:.0f} ms "
                     f"| {d['cpu_s'] * 1e3:.0f} / {d['wall_s'] * 1e3:.0f} ms, (s^T W)^T form |")
    if core.get("memory"):
        mem = "resident: " + "; ".join(f"{m['n']} tokens: {m['core']['peak_n2']:.2f} / {m['node']['peak_n2']:.2f}" for m in core["memory"])
        live = [m for m in core["memory"] if "tensor_peak_n2" in m["core"] and "tensor_peak_n2" in m["node"]]
        if live:
            mem += "; live tensors (any allocator): " + "; ".join(
                f"{m['n']} tokens: {m['core']['tensor_peak_n2']:.2f} / {m['node']['tensor_peak_n2']:.2f}" for m in live)
        lines.append(f"| graph peak extra memory, core / node, in N x N float32 (resident memory from a reset high-water mark, "
                     f"with glibc's mmap threshold fixed at 64 KB; with its default, as ComfyUI runs, the node path peaked at "
                     f"2.45-3.25 over five runs at 4096 tokens) | {mem} | {g['naive']['peak_n2']:.2f} at {n} |")
    if "interrupt" in core:
        r = core["interrupt"]
        lines.append(f"| Stop (/interrupt) during Build Gated Graph at {r['n']} tokens (2048 x 2048, 2 layers) | "
                     f"largest gap between checks over a whole {r['build_wall_s']:.0f} s build: {r['max_gap_s']:.2f} s wall; "
                     f"asked 3 s in, stopped {r['latency_s']:.2f} s later | |")
    return lines


def full_rows(full):
    p = [f"{r['cpu_s']:.0f} ({r['wall_s']:.0f})" for r in full["plain"]]
    q = [f"{r['cpu_s']:.0f} ({r['wall_s']:.0f})" for r in full["record"]]
    lines = [
        f"| {full['model']} shape, {full['tokens']} + {full['text_tokens']} tokens, random bf16 weights, float32 math, "
        f"{full['threads']} thread: one forward | CPU-s (wall s) |",
        "|---|---|",
        f"| plain, alternating runs | {' / '.join(p)} |",
        f"| recorded (maps kept: {full['held_mb']:.0f} MB) | {' / '.join(q)} |",
        f"| recorded / plain, best of each by CPU time | x{full['ratio_cpu']:.3f}; image {'bit-identical' if full['identical'] else 'CHANGED'} |",
    ]
    if full.get("ratio_cpu_pairs"):
        lines.append(f"| recorded / plain, run by run (each with the plain run before it) | "
                     f"{' / '.join(f'x{x:.3f}' for x in full['ratio_cpu_pairs'])} |")
    per_block = [r["recorder_cpu_s_per_block"] for r in full["record"] if r.get("recorder_cpu_s_per_block")]
    if per_block:
        graph = set(full["graph_layers"])
        own = min(sum(b) for b in per_block)
        best = min(per_block, key=sum)
        in_graph = sum(best[i] for i in graph)
        plain = min(r["cpu_s"] for r in full["plain"])
        lines.append(f"| the recorder's own CPU time (timed around each block's recording; free of the forward's run-to-run "
                     f"spread), best run | {own:.1f} CPU-s = x{(plain + own) / plain:.3f} of the best plain: graph layers "
                     f"{in_graph:.1f} s, concept stream in the other {len(best) - len(graph)} blocks {own - in_graph:.1f} s |")
    return lines


SHAPES = {  # what each depth-reduced model keeps of the real one (bench_capture.py FULL_SHAPES)
    "sd3.5-large": "hidden 2432, 38 heads, qk-norm",
    "flux.1-dev": "hidden 3072, 24 heads; 19 double- + 38 single-stream blocks, the first 2 of each kept; 4096 + 512 tokens",
}
ANCHOR_MAPS = {"paper": "anchor_maps = paper", "all": "anchor_maps = all blocks (the consensus default)"}


# the depth-reduced runs of --run, and their committed results (benchmarks/results/), in table order
LARGE_RUNS = (("sd3.5-large", "4", "paper"), ("flux.1-dev", "2,2", "paper"), ("flux.1-dev", "2,2", "all"))
LARGE_RESULTS = ("sd3.5-large-4blocks-cpu.json", "flux.1-dev-2+2blocks-paper-cpu.json", "flux.1-dev-2+2blocks-all-cpu.json")


def large_rows(large):
    plain, rec = min(r["cpu_s"] for r in large["plain"]), min(large["record"], key=lambda r: r["cpu_s"])
    x = large.get("extrapolated")
    maps = ANCHOR_MAPS.get(large.get("anchor_maps") or "paper")  # results without the field predate the consensus default
    lines = [
        f"| {large['model']} shape ({SHAPES[large['model']]}), {large['blocks']} of {large['full_depth']} blocks, "
        f"graph layers {large['graph_layers']}, Seg4Diff {large['seg4diff_layer']}, {maps}: one forward | CPU-s (wall s) |",
        "|---|---|",
        f"| plain / recorded (maps kept: {large['held_mb']:.0f} MB) | {plain:.0f} ({min(r['wall_s'] for r in large['plain']):.0f}) / "
        f"{rec['cpu_s']:.0f} ({rec['wall_s']:.0f}) |",
        f"| recorded / plain, {large['blocks']} blocks | x{large['ratio_cpu']:.3f} by CPU time; image "
        f"{'bit-identical' if large['identical'] else 'CHANGED'} |",
    ]
    if x:
        lines.append(f"| extrapolated to all {large['full_depth']} blocks (not measured: {x['how']}) | x{x['ratio_cpu']:.3f} |")
        lines.append(f"| the recorder's own CPU time, extrapolated the same way | {100 * recorder_share(large):.1f}% of the plain forward |")
    return lines


def recorder_share(large) -> float:
    """The recorder's own CPU time (per-block recording as measured, graph / Seg4Diff / other blocks counted as
    the full model has them, plus the rest of the recorded run's extra) over the full model's plain forward."""
    x = large["extrapolated"]
    return (x["record_cpu_s"] - x["plain_cpu_s"]) / x["plain_cpu_s"]


def gpu_rows(gpu):
    f, c, u = gpu["fused"], gpu["fused_compact"], gpu["unfused"]
    return [
        f"| GPU: not measured (no GPU was available); `benchmarks/gpu_estimate.py`, H100 SXM roofline at "
        f"{gpu['efficiency']:.0%} of peak, {gpu['tokens']} + {gpu['text']} tokens, K = {gpu['concepts']} | estimate |",
        "|---|---|",
        f"| recorded / plain forward, precision fast with the Triton kernels | x{f['ratio']:.2f} "
        f"({f['recorded_ms']:.1f} / {f['plain_ms']:.1f} ms; recorder moves {f['record_gb']:.1f} GB; compact x{c['ratio']:.2f}) |",
        f"| the same without triton (per-head scores through HBM) | x{u['ratio']:.2f} (recorder moves {u['record_gb']:.1f} GB) |",
        f"| graph + propagation, K = {gpu['concepts']} | {f['graph_ms']:.1f} ms |",
    ]


def table(core, full, large=(), gpu=None):
    """`large`: the depth-reduced results (bench_capture --full NAME --blocks ...), one table each."""
    lines = ["Measured with `python -m benchmarks.readme_table --run` (CPU time next to wall time: the machine is shared).", ""]
    if core:
        lines += core_rows(core) + [""]
    if full:
        lines += full_rows(full) + [""]
    for one in large:
        lines += large_rows(one) + [""]
    if gpu:
        lines += gpu_rows(gpu)
    return "\n".join(lines).strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("core", nargs="?", help="bench_core.py --json output ('-' = none)")
    p.add_argument("full", nargs="?", help="bench_capture.py --full --json output")
    p.add_argument("--large", action="append", default=[], help="bench_capture.py --full NAME --blocks ... --json output "
                   "(repeatable: SD3.5 Large, Flux.1 dev with each anchor_maps setting)")
    p.add_argument("--gpu", default=None, help="gpu_estimate.py --json output")
    p.add_argument("--run", action="store_true")
    args = p.parse_args()
    if args.run:
        args.core, args.full = "/tmp/anchordiff_core.json", "/tmp/anchordiff_full.json"
        subprocess.run([sys.executable, "-m", "benchmarks.bench_core", "--json", args.core], check=True, cwd=ROOT)
        subprocess.run([sys.executable, "-m", "benchmarks.bench_capture", "--full", "sd3-medium", "--repeats", "3", "--json", args.full], check=True, cwd=ROOT)
        args.large, args.gpu = [], "/tmp/anchordiff_gpu.json"
        for name, blocks, maps in LARGE_RUNS:
            args.large.append(f"/tmp/anchordiff_{name}_{maps}.json")
            subprocess.run([sys.executable, "-m", "benchmarks.bench_capture", "--full", name, "--blocks", blocks,
                            "--graph-layers", "1,2", "--seg4diff-layer", "0", "--repeats", "2", "--anchor-maps", maps,
                            "--json", args.large[-1]], check=True, cwd=ROOT)
        subprocess.run([sys.executable, "-m", "benchmarks.gpu_estimate", "--json", args.gpu], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    core = json.load(open(args.core)) if args.core and args.core != "-" else None
    full = json.load(open(args.full)) if args.full else None
    large = [json.load(open(path)) for path in args.large]
    gpu = json.load(open(args.gpu)) if args.gpu else None
    path = os.path.join(ROOT, "docs", "PERFORMANCE.md")
    text = open(path).read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    open(path, "w").write(text[:start] + "\n" + table(core, full, large, gpu) + "\n" + text[end:])


if __name__ == "__main__":
    main()
