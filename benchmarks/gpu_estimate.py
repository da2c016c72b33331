"""FLOP and byte count per phase of a recorded SD3 Medium step on a GPU, and the time they imply.

    python -m benchmarks.gpu_estimate [--tokens 4096] [--text 333] [--concepts 4] [--json FILE]

No GPU was available to this project's benchmarks, so this derives, from the shapes alone, each
phase's multiply-adds, exponentials and memory traffic, and a roofline time on an H100 SXM (dense
bf16 989 TFLOP/s, TF32 495, float32 67, HBM 3.35 TB/s, special functions (exp) 3.9 T/s as the
FlashAttention-3 paper gives it): time = max(flops / peak, bytes / bandwidth, exps / exp rate), at a
stated efficiency.  Kernel launch latency is not counted (the host runs ahead of the GPU).

The recorder's graph layers are counted for `precision = fast` with the fused Triton kernels of
anchordiff_core/fused_attention.py (what runs on CUDA when triton is installed), and, for
comparison, without them (head by head, float32 scores through HBM).  Fused tile loads are counted
as HBM reads although q and k of one image (2 x 12.6 MB at 1024^2) fit the H100's 50 MB L2: an
upper bound on the traffic.
"""
import argparse
import json

PEAK = {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}
BANDWIDTH = 3.35e12
EXP_RATE = 3.9e12  # exponentials per second (multi-function units)
EFFICIENCY = 0.5  # fraction of peak reached by real kernels (compute, bandwidth and exp alike)
TILE_M, TILE_N = 128, 64  # fused_attention._blocks on a GPU


def phases(n, text, k, depth=24, hidden=1536, heads=24, graph_layers=2, density=0.02, steps=160, fused=True,
           a_bytes=4, seg4diff_on_graph_layer=True):
    """[(name, group, flops, precision, bytes, exps)] per phase; group: plain / record / graph."""
    tokens = n + text
    d = hidden
    t = 2 * k  # concept tokens (about two per concept)
    g = graph_layers
    out = []
    # plain forward: per block 12 D^2 per token (qkv 3, proj 1, MLP 8; both streams), attention 2 L^2 D
    lin = depth * 12 * d * d * tokens
    att = depth * 2 * tokens * tokens * d
    block_weights = 18 * d * d * 2  # one stream's weights per block, bf16: adaLN 6 D^2, qkv 3, proj 1, MLP 8
    weights = depth * 2 * block_weights  # both streams, read once
    act = depth * tokens * d * 2 * 30  # ~30 activation reads/writes of [L, D] bf16 per block
    out.append(("plain forward (bf16)", "plain", 2 * (lin + att), "bf16", weights + act, depth * heads * tokens * tokens))
    # recorder, every block: A_CI (t queries x N keys), concept stream (t tokens through the block), CA scores
    per_block = t * n * d * 3 + t * 12 * d * d + t * n * d
    out.append(("recorder, every block: A_CI, concept stream, ConceptAttention", "record", 2 * depth * per_block, "fp32",
                depth * (block_weights + 3 * n * d * 2 + 3 * t * n * 4), depth * 2 * heads * t * n))  # the concept stream reads the context block's weights again
    scores = g * 2 * n * n * d  # q_h k_h^T over all heads, per pass
    if fused:
        qk = n * d * 2  # one layer's q or k, bf16
        # pass 1: row log-sum-exp; each program streams its head's keys past a tile of TILE_M query rows
        out.append(("recorder, graph layers: row log-sum-exp of each head (Triton)", "record", scores, "tf32",
                    g * (qk + n * n * d * 2 // TILE_M + heads * n * 4), g * heads * n * n))
        # pass 2: per output tile and head, q rows, k columns and the rows' lse loaded, exp(score - lse)
        # summed; the tile written once
        out.append((f"recorder, graph layers: head mean of A_II (Triton), written once as {a_bytes * 8}-bit", "record", scores,
                    "tf32", g * (n * n * d * 2 * (TILE_M + TILE_N) // (TILE_M * TILE_N) + heads * n * n * 4 // TILE_N + n * n * a_bytes),
                    g * heads * n * n))
    else:
        # head by head: scores written, softmax read + write, head sum read + accumulator, float32
        out.append(("recorder, graph layers: scores, softmax, head mean of A_II (no triton)", "record", scores, "tf32",
                    g * heads * n * n * 4 * 5, g * heads * n * n))
    if seg4diff_on_graph_layer:  # SD3 Medium's Seg4Diff layer 9 is a graph layer: scores on the prompt + concept keys
        m = text + t
        out.append(("recorder, Seg4Diff on a graph layer: image queries x prompt/concept keys (float32)", "record",
                    2 * n * m * d, "tf32", heads * n * m * 4 * 4, heads * n * m))
    out.append(("recorder, graph layers: O_II by fused attention (bf16)", "record", 2 * 2 * g * n * n * d, "bf16",
                g * n * d * 2 * 4, g * heads * n * n))
    # graph: layer mean + W_attn tiles (upper triangle, fp32 exact), percentile passes, W_cos row blocks
    out.append(("graph: layer mean + W_attn (N^3/2, float32)", "graph", 2 * n * n * n / 2, "fp32", (g + 3) * n * n * 4, 0))
    out.append(("graph: percentile (about 8 passes over W_attn)", "graph", 0, "fp32", 8 * n * n * 4, 0))
    out.append(("graph: W_cos row blocks, gate, edges", "graph", 2 * n * n * d, "fp32", 3 * n * n * 4, 0))
    edges = density * n * n
    out.append((f"propagate {steps} steps, K = {k}", "graph", 2 * steps * edges * k, "fp32", steps * (edges * 8 + 2 * n * k * 4), 0))
    return out


def phase_ms(flops, precision, nbytes, exps):
    return 1e3 * max(flops / (PEAK[precision] * EFFICIENCY), nbytes / (BANDWIDTH * EFFICIENCY), exps / (EXP_RATE * EFFICIENCY))


def totals(rows):
    total = {"plain": 0.0, "record": 0.0, "graph": 0.0}
    for _, group, flops, precision, nbytes, exps in rows:
        total[group] += phase_ms(flops, precision, nbytes, exps)
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--text", type=int, default=333)
    p.add_argument("--concepts", type=int, default=4)
    p.add_argument("--json", default=None, help="also write the totals here (benchmarks/readme_table.py reads them)")
    args = p.parse_args()
    rows = phases(args.tokens, args.text, args.concepts)
    print(f"SD3 Medium, {args.tokens} image + {args.text} text tokens, K = {args.concepts}, precision fast with the Triton "
          f"kernels; H100 SXM roofline at {EFFICIENCY:.0%} efficiency\n")
    print("| phase | GFLOP | precision | GB moved | G exp | ms |")
    print("|---|---|---|---|---|---|")
    for name, group, flops, precision, nbytes, exps in rows:
        print(f"| {name} | {flops / 1e9:.0f} | {precision} | {nbytes / 1e9:.2f} | {exps / 1e9:.2f} | {phase_ms(flops, precision, nbytes, exps):.2f} |")
    result = {"tokens": args.tokens, "text": args.text, "concepts": args.concepts, "efficiency": EFFICIENCY}
    for name, kw in (("fused", {}), ("fused_compact", {"a_bytes": 2}), ("unfused", {"fused": False})):
        total = totals(phases(args.tokens, args.text, args.concepts, **kw))
        result[name] = {"plain_ms": total["plain"], "recorded_ms": total["plain"] + total["record"],
                        "ratio": (total["plain"] + total["record"]) / total["plain"], "graph_ms": total["graph"],
                        "record_gb": sum(r[4] for r in phases(args.tokens, args.text, args.concepts, **kw) if r[1] == "record") / 1e9}
    f, c, u = result["fused"], result["fused_compact"], result["unfused"]
    print(f"\nplain forward {f['plain_ms']:.1f} ms; recorded forward {f['recorded_ms']:.1f} ms (x{f['ratio']:.2f}; "
          f"recorder moves {f['record_gb']:.1f} GB); graph + propagation {f['graph_ms']:.1f} ms")
    print(f"compact (A_II written as float16): x{c['ratio']:.2f}; without triton (head by head through HBM): "
          f"{u['recorded_ms']:.1f} ms (x{u['ratio']:.2f}; recorder moves {u['record_gb']:.1f} GB)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
