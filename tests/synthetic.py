"""Synthetic attention maps with known structure, shared by tests and docs figures."""
import torch


def look_alike_scene(h=16, w=16, d=32, seed=0, background_noise=0.3):
    """Two look-alike objects A and B on a background.

    O_II: A and B share one feature direction (raw output similarity links them); background has
    another.  A_II: each token attends to nearby tokens of its OWN region only, so rows of A and
    rows of B have disjoint supports (row-wise attention does not link them).
    A larger `background_noise` makes the background less self-similar.
    """
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    region = torch.zeros(h, w, dtype=torch.long)
    region[2:7, 2:7] = 1  # A
    region[9:14, 9:14] = 2  # B (same size and look)
    region = region.flatten()
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    dist2 = torch.cdist(pos, pos) ** 2
    same = region[:, None] == region[None, :]
    logits = -dist2 / 4.0 + torch.randn(h * w, h * w, generator=g) * 0.1
    logits = logits.masked_fill(~same, -1e4)
    a_ii = torch.softmax(logits, dim=1)
    obj, bg = torch.randn(d, generator=g), torch.randn(d, generator=g)
    noise = torch.where((region > 0)[:, None], torch.tensor(0.3), torch.tensor(background_noise))
    o_ii = torch.where((region > 0)[:, None], obj, bg) + noise * torch.randn(h * w, d, generator=g)
    return a_ii, o_ii, region
