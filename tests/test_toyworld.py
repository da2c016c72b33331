"""The toy world (toyworld/): deterministic scenes, exact masks, fixed splits, and its text encoder."""
import numpy as np
import pytest
import torch

from toyworld import COLOURS, KIND_WEIGHTS, SPLITS, make_scene
from toyworld.text import encode_lg


def test_same_seed_same_scene_and_sizes_agree():
    a, b = make_scene(123), make_scene(123)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, make_scene(124).image)
    big = make_scene(123, 512)
    assert big.caption == a.caption and big.objects == a.objects
    # the 512 px masks, pooled 2x2 by majority, agree with the 256 px masks almost everywhere
    pooled = big.object_masks.reshape(len(big.objects), 256, 2, 256, 2).mean((2, 4)) > 0.5
    assert (pooled != a.object_masks).mean() < 0.01


def test_masks_are_exact_and_concepts_are_unions():
    for seed in SPLITS["val"].seeds(20):
        s = make_scene(seed)
        assert s.object_masks.shape == (len(s.objects), 256, 256)
        assert not (s.object_masks.sum(0) > 1).any(), "visible object masks must not overlap"
        for i, o in enumerate(s.objects):
            m = s.object_masks[i]
            if m.sum() < 50:
                continue
            # pixels inside the mask (away from anti-aliased edges) carry the object's colour
            inner = m & np.roll(m, 2, 0) & np.roll(m, -2, 0) & np.roll(m, 2, 1) & np.roll(m, -2, 1)
            mean = s.image[inner].astype(float).mean(0)
            assert np.abs(mean - np.array(COLOURS[o.colour])).max() < 0.15 * 255, (seed, o)
        for c in s.concepts:
            want = s.object_masks[list(c.objects)].any(0) if c.objects else ~s.object_masks.any(0)
            assert np.array_equal(c.mask, want)
            assert c.level in ("word", "phrase") and (c.level == "phrase") == (" " in c.name)
            if c.objects:
                assert all(c.name.split()[-1] in (s.objects[i].shape, s.objects[i].colour) for i in c.objects)
        assert s.caption.endswith(f" on {s.background}")


def test_hard_cases_come_in_their_proportions():
    kinds = [make_scene(seed).kind for seed in SPLITS["train"].seeds(300)]
    for kind, weight in KIND_WEIGHTS.items():
        share = kinds.count(kind) / len(kinds)
        assert abs(share - weight) < 0.1, (kind, share)
    s = make_scene(SPLITS["test"].start, kind="lookalike")
    a, b = s.lookalike
    assert s.objects[a].shape == s.objects[b].shape and s.objects[a].colour != s.objects[b].colour


def test_splits_are_disjoint():
    ranges = sorted((r.start, r.stop) for r in SPLITS.values())
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError):
        SPLITS["val"].seeds(10**7)


def test_toy_text_encoder_binds_adjectives_to_nouns():
    # ids of CLIP-L/G for "red circle blue square" vs "blue circle red square" (made-up ids: the
    # encoder is a function of ids only)
    red, circle, blue, square = 11, 22, 33, 44
    a = encode_lg([red, circle, blue, square], [red, circle, blue, square])
    b = encode_lg([blue, circle, red, square], [blue, circle, red, square])
    bag_a = encode_lg([red, circle, blue, square], [red, circle, blue, square], context=False)
    bag_b = encode_lg([blue, circle, red, square], [blue, circle, red, square], context=False)
    # without context the two captions are the same bag of vectors; with it, "circle" differs
    torch.testing.assert_close(bag_a.sum(0), bag_b.sum(0))
    assert (a[1] - b[1]).abs().max() > 0.1
    assert a.shape == (4, 4096) and torch.equal(a[:, 2048:], torch.zeros(4, 2048))


def test_sample_reader_reads_the_worlds_own_renderings():
    # toyworld.samples reads colour and shape of generated samples; on true renderings it must be
    # right nearly always, and a different colour or shape must not pass as the named one
    from toyworld.samples import read_sample, render_truth, sample_accuracy
    truth = sample_accuracy(20, truth=True)
    assert truth["colour_rate"] >= 0.95 and truth["shape_rate"] >= 0.85, truth
    got = read_sample(render_truth("triangle", "blue", "sand", seed=3), "sand")
    assert (got["colour"], got["shape"]) == ("blue", "triangle")
    got = read_sample(render_truth("circle", "purple", "stone", seed=4), "stone")
    assert (got["colour"], got["shape"]) == ("purple", "circle")
    # a bare ground has no object
    from toyworld.world import _background
    ground = np.clip(np.round(_background(np.random.default_rng(1), "sand", 256)), 0, 255).astype(np.uint8)
    assert read_sample(ground, "sand")["colour"] is None
