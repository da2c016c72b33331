"""FLOP and byte count per phase of a recorded SD3 Medium step on a GPU, and the time they imply.

    python benchmarks/gpu_estimate.py [--tokens 4096] [--text 333] [--concepts 4]

No GPU was available to this project's benchmarks, so this derives, from the shapes alone, each
phase's multiply-adds and its memory traffic, and a roofline time on an H100 SXM (dense bf16
989 TFLOP/s, TF32 495, float32 67, HBM 3.35 TB/s): time = max(flops / peak, bytes / bandwidth),
at a stated efficiency.  Kernel launch latency is not counted (the host runs ahead of the GPU).
"""
import argparse

PEAK = {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}
BANDWIDTH = 3.35e12
EFFICIENCY = 0.5  # fraction of peak reached by real kernels (both compute and bandwidth)


def phases(n, text, k, depth=24, hidden=1536, heads=24, graph_layers=2, density=0.02, steps=160):
    tokens = n + text
    d = hidden
    t = 2 * k  # concept tokens (about two per concept)
    out = []
    # plain forward: per block 12 D^2 per token (qkv 3, proj 1, MLP 8; both streams), attention 2 L^2 D
    lin = depth * 12 * d * d * tokens
    att = depth * 2 * tokens * tokens * d
    weights = depth * 12 * d * d * 2 * 2  # both streams' weights, bf16, read once
    act = depth * tokens * d * 2 * 30  # ~30 activation reads/writes of [L, D] bf16 per block
    out.append(("plain forward (bf16)", "plain", 2 * (lin + att), "bf16", weights + act))
    # recorder, every block: A_CI (t queries x N keys), concept stream (t tokens through the block), CA scores
    per_block = t * n * d * 3 + t * 12 * d * d + t * n * d
    out.append(("recorder, every block: A_CI, concept stream, ConceptAttention", "record", 2 * depth * per_block, "fp32",
                depth * (3 * n * d * 2 + 3 * t * n * 4)))
    # recorder, graph layers: scores q_h k_h^T (TF32, exact on bf16 inputs), softmax, head sum (fp32 traffic)
    scores = graph_layers * n * n * d
    score_bytes = graph_layers * heads * n * n * 4 * 5  # write scores, softmax read+write, head sum read + accumulator
    out.append(("recorder, graph layers: scores, softmax, head mean of A_II", "record", 2 * scores, "tf32", score_bytes))
    out.append(("recorder, graph layers: O_II by fused attention (bf16)", "record", 2 * 2 * graph_layers * n * n * d, "bf16",
                graph_layers * n * d * 2 * 4))
    # graph: layer mean, W_attn tiles (upper triangle, fp32 exact), percentile passes, W_cos row blocks
    out.append(("graph: layer mean + W_attn (N^3/2, float32)", "graph", 2 * n * n * n / 2, "fp32", (graph_layers + 3) * n * n * 4))
    out.append(("graph: percentile (about 8 passes over W_attn)", "graph", 0, "fp32", 8 * n * n * 4))
    out.append(("graph: W_cos row blocks, gate, edges", "graph", 2 * n * n * d, "fp32", 3 * n * n * 4))
    edges = density * n * n
    out.append((f"propagate {steps} steps, K = {k}", "graph", 2 * steps * edges * k, "fp32", steps * (edges * 8 + 2 * n * k * 4)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--text", type=int, default=333)
    p.add_argument("--concepts", type=int, default=4)
    args = p.parse_args()
    rows = phases(args.tokens, args.text, args.concepts)
    total = {}
    print(f"SD3 Medium, {args.tokens} image + {args.text} text tokens, K = {args.concepts}; H100 SXM roofline at {EFFICIENCY:.0%} efficiency\n")
    print("| phase | GFLOP | precision | GB moved | ms |")
    print("|---|---|---|---|---|")
    for name, group, flops, precision, nbytes in rows:
        ms = 1e3 * max(flops / (PEAK[precision] * EFFICIENCY), nbytes / (BANDWIDTH * EFFICIENCY))
        total[group] = total.get(group, 0) + ms
        print(f"| {name} | {flops / 1e9:.0f} | {precision} | {nbytes / 1e9:.2f} | {ms:.2f} |")
    print(f"\nplain forward {total['plain']:.1f} ms; recorded forward {total['plain'] + total['record']:.1f} ms "
          f"(x{(total['plain'] + total['record']) / total['plain']:.2f}); graph + propagation {total['graph']:.1f} ms")


if __name__ == "__main__":
    main()
