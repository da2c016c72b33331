"""A literal, float64 numpy transcription of what one recorded step keeps, for tests only:
AnchorDiff eqs. 3-6 and the two attention baselines, written from the papers (docs/DESIGN.md
for the choices they leave open), one head and one image at a time, sharing no code with
anchordiff_core.

Per joint block the model hands over, for the recorded rows (all [B, L, heads * d]):
image q/k/v, the model's own joint-attention output at the image queries, the prompt's keys, and
the concept stream's q/k/v.
"""
import numpy as np


def softmax(logits):
    logits = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def heads_of(x, heads):
    """[L, H*d] -> list of H arrays [L, d]."""
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1] // heads
    return [x[:, h * d:(h + 1) * d] for h in range(heads)]


def concept_mean(rows, token_concept, k):
    """Rows [T, ...] -> [K, ...]: a concept's tokens averaged."""
    token_concept = np.asarray(token_concept)
    return np.stack([rows[token_concept == c].mean(axis=0) for c in range(k)])


def block_maps(q_img, k_img, v_img, img_out, k_txt, q_c, k_c, v_c, heads, token_concept, k):
    """One image, one block. Returns a dict of A_II [N, N], O_II [N, H*d] (eqs. 3-4), A_CI [K, N]
    (eq. 5), the concept stream's output o_c [T, H*d], ConceptAttention's logits [K, N] and
    Seg4Diff's map [K, N]."""
    qi, ki, vi = heads_of(q_img, heads), heads_of(k_img, heads), heads_of(v_img, heads)
    kt = heads_of(k_txt, heads)
    qc, kc, vc = heads_of(q_c, heads), heads_of(k_c, heads), heads_of(v_c, heads)
    d = qi[0].shape[1]
    n, t = qi[0].shape[0], qc[0].shape[0]
    a_ii = np.zeros((n, n))
    o_ii_heads, o_c_heads = [], []
    a_ci_tokens = np.zeros((t, n))
    seg_tokens = np.zeros((n, t))
    for h in range(heads):
        # eq. 3: image queries, image keys only
        a = softmax(qi[h] @ ki[h].T / np.sqrt(d))
        a_ii += a / heads
        o_ii_heads.append(a @ vi[h])  # eq. 4, per head
        # eq. 5: concept queries, image keys only
        a_ci_tokens += softmax(qc[h] @ ki[h].T / np.sqrt(d)) / heads
        # the concept stream (ConceptAttention, one-directional): concept queries over image and concept keys
        p = softmax(qc[h] @ np.concatenate([ki[h], kc[h]]).T / np.sqrt(d))
        o_c_heads.append(p @ np.concatenate([vi[h], vc[h]]))
        # Seg4Diff: image queries over the joint keys, concept tokens appended to the prompt's
        joint = np.concatenate([ki[h], kt[h], kc[h]])
        p = softmax(qi[h] @ joint.T / np.sqrt(d))
        seg_tokens += p[:, n + kt[h].shape[0]:] / heads
    o_ii = np.concatenate(o_ii_heads, axis=1)
    o_c = np.concatenate(o_c_heads, axis=1)
    # ConceptAttention: the model's image outputs . L2-normalised concept outputs (tokens averaged first)
    concepts = concept_mean(o_c, token_concept, k)
    concepts = concepts / np.linalg.norm(concepts, axis=1, keepdims=True)
    ca = concepts @ np.asarray(img_out, dtype=np.float64).T
    return {
        "a_ii": a_ii, "o_ii": o_ii, "a_ci": concept_mean(a_ci_tokens, token_concept, k), "o_c": o_c,
        "ca_scores": ca, "seg4diff": concept_mean(seg_tokens.T, token_concept, k),
    }


def recorded_step(blocks, heads, token_concept, k, graph_layers, seg4diff_layer, row_image, num_images):
    """`blocks[l]` = the inputs of block l for every recorded row (arrays [R, L, H*d]). Rows of the
    same image (several positive conditionings) are averaged. Returns per image: a_ci [B, L, K, N],
    ca_scores [B, L, K, N], a_ii / o_ii [B, G, ...] for the graph layers, seg4diff [B, K, N]."""
    rows = len(row_image)
    per_row = [[block_maps(*(np.asarray(x)[r] for x in block), heads, token_concept, k) for block in blocks] for r in range(rows)]

    def image_mean(values):  # values[r] for each row -> [B, ...]
        values = np.stack(values)
        return np.stack([values[np.asarray(row_image) == b].mean(axis=0) for b in range(num_images)])

    return {
        "a_ci": image_mean([np.stack([m["a_ci"] for m in row]) for row in per_row]),
        "ca_scores": image_mean([np.stack([m["ca_scores"] for m in row]) for row in per_row]),
        "a_ii": image_mean([np.stack([row[g]["a_ii"] for g in graph_layers]) for row in per_row]),
        "o_ii": image_mean([np.stack([row[g]["o_ii"] for g in graph_layers]) for row in per_row]),
        "seg4diff": image_mean([row[seg4diff_layer]["seg4diff"] for row in per_row]),
        "ic": image_mean([np.stack([m["seg4diff"] for m in row]) for row in per_row]),  # every block [B, L, K, N]
        "o_c": [[m["o_c"] for m in row] for row in per_row],  # per row, per block
    }
