"""Regenerate the README's performance table from the benchmarks' JSON results.

    python benchmarks/readme_table.py --run          # runs bench_core.py and bench_capture.py --full (long), then writes
    python benchmarks/readme_table.py CORE.json FULL.json   # from saved results

Replaces the text between the markers <!-- bench:begin --> and <!-- bench:end --> in README.md.
"""
import argparse
import json
import os
import subprocess
import sys

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
        lines.append(f"| Propagate (160 steps), K = {row['k']} | {o['cpu_s'] * 1e3:.0f} / {o['wall_s'] * 1e3:.0f} ms "
                     f"| {d['cpu_s'] * 1e3:.0f} / {d['wall_s'] * 1e3:.0f} ms, (s^T W)^T form |")
    if core.get("memory"):
        mem = "; ".join(f"{m['n']} tokens: {m['core']['peak_n2']:.2f} / {m['node']['peak_n2']:.2f}" for m in core["memory"])
        lines.append(f"| graph peak extra memory, core / node, in N x N float32 (reset high-water mark) | {mem} | "
                     f"{g['naive']['peak_n2']:.2f} at {n} |")
    if "interrupt" in core:
        r = core["interrupt"]
        lines.append(f"| Stop (/interrupt) during Build Gated Graph at {r['n']} tokens (2048 x 2048) | "
                     f"{r['latency_s']:.2f} s wall (largest gap between checks {r['max_gap_s']:.2f} s) | |")
    return lines


def full_rows(full):
    p = [f"{r['cpu_s']:.0f} ({r['wall_s']:.0f})" for r in full["plain"]]
    q = [f"{r['cpu_s']:.0f} ({r['wall_s']:.0f})" for r in full["record"]]
    return [
        f"| {full['model']} shape, {full['tokens']} + {full['text_tokens']} tokens, random bf16 weights, float32 math, "
        f"{full['threads']} thread: one forward | CPU-s (wall s) |",
        "|---|---|",
        f"| plain, alternating runs | {' / '.join(p)} |",
        f"| recorded (maps kept: {full['held_mb']:.0f} MB) | {' / '.join(q)} |",
        f"| recorded / plain, best of each by CPU time | x{full['ratio_cpu']:.3f}; image {'bit-identical' if full['identical'] else 'CHANGED'} |",
    ]


def table(core, full):
    lines = ["Measured with `python benchmarks/readme_table.py --run` (CPU time next to wall time: the machine is shared).", ""]
    if core:
        lines += core_rows(core) + [""]
    if full:
        lines += full_rows(full)
    return "\n".join(lines).strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("core", nargs="?", help="bench_core.py --json output ('-' = none)")
    p.add_argument("full", nargs="?", help="bench_capture.py --full --json output")
    p.add_argument("--run", action="store_true")
    args = p.parse_args()
    if args.run:
        args.core, args.full = "/tmp/anchordiff_core.json", "/tmp/anchordiff_full.json"
        here = os.path.join(ROOT, "benchmarks")
        subprocess.run([sys.executable, os.path.join(here, "bench_core.py"), "--json", args.core], check=True)
        subprocess.run([sys.executable, os.path.join(here, "bench_capture.py"), "--full", "sd3-medium", "--json", args.full], check=True)
    core = json.load(open(args.core)) if args.core and args.core != "-" else None
    full = json.load(open(args.full)) if args.full else None
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    open(path, "w").write(text[:start] + "\n" + table(core, full) + "\n" + text[end:])


if __name__ == "__main__":
    main()
