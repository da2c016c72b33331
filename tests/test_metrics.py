"""Tests for anchordiff_core.metrics on hand-computed cases and brute-force references."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anchordiff_core.metrics import (
    BinarySegmentationMeter,
    MultiConceptMeter,
    average_precision,
    confusion_pair_metrics,
    mean_threshold,
    minmax_normalize,
)

# ----------------------------------------------------------------------------- fixtures by hand

# 4x4 image. Heat max 8 -> normalised 0 / 0.5 / 1; mean = (3*0.5 + 1)/16 = 0.15625,
# so the prediction is exactly the four non-zero pixels (1,1) (1,2) (2,1) (2,2).
HEAT_4x4 = np.array([[0, 0, 0, 0],
                     [0, 4, 4, 0],
                     [0, 4, 8, 0],
                     [0, 0, 0, 0]], dtype=float)
# Foreground: (1,1) (1,2) (1,3) (2,2) (2,3) -> 5 pixels.
GT_4x4 = np.array([[0, 0, 0, 0],
                   [0, 1, 1, 1],
                   [0, 0, 1, 1],
                   [0, 0, 0, 0]])
# TP = (1,1) (1,2) (2,2) = 3; FP = (2,1) = 1; FN = (1,3) (2,3) = 2; TN = 16 - 6 = 10.
# Acc = 13/16; IoU_fg = 3/(3+1+2) = 1/2; IoU_bg = 10/(10+1+2) = 10/13.
# AP: thresholds 1.0 -> TP1 FP0 (P 1, R 1/5); 0.5 -> TP3 FP1 (P 3/4, R 3/5);
#     0.0 -> TP5 FP11 (P 5/16, R 1). AP = 1/5*1 + 2/5*3/4 + 2/5*5/16 = 0.2 + 0.3 + 0.125 = 0.625.


def test_binary_single_image_by_hand():
    m = BinarySegmentationMeter()
    per = m.update(HEAT_4x4, GT_4x4)
    assert per["acc"] == pytest.approx(13 / 16)
    assert per["iou_fg"] == pytest.approx(1 / 2)
    assert per["iou_bg"] == pytest.approx(10 / 13)
    assert per["ap"] == pytest.approx(0.625)
    r = m.compute()
    assert r["acc"] == pytest.approx(13 / 16)
    assert r["miou"] == pytest.approx((1 / 2 + 10 / 13) / 2)
    assert r["map"] == pytest.approx(0.625)
    # Both classes summed: (3 + 10) / (6 + 13) = 13/19 = Acc/(2-Acc) = (13/16)/(19/16).
    assert r["miou_conceptattention_protocol"] == pytest.approx(13 / 19)


def test_binary_accumulates_over_dataset_not_per_image():
    # Second image 2x2: heat [[1,0],[0,0]], gt the same -> TP1 TN3, perfect.
    m = BinarySegmentationMeter()
    m.update(HEAT_4x4, GT_4x4)
    m.update(np.array([[1.0, 0], [0, 0]]), np.array([[1, 0], [0, 0]]))
    r = m.compute()
    # Pooled: correct 13+4 = 17 of 20; I_fg 3+1 = 4, U_fg 6+1 = 7; I_bg 10+3 = 13, U_bg 13+3 = 16.
    assert r["acc"] == pytest.approx(17 / 20)
    assert r["iou_fg"] == pytest.approx(4 / 7)
    assert r["iou_bg"] == pytest.approx(13 / 16)
    assert r["miou"] == pytest.approx((4 / 7 + 13 / 16) / 2)
    # Averaging per-image mIoU would give ((1/2 + 10/13)/2 + 1)/2 = 0.817..., not 0.692.
    assert r["miou"] != pytest.approx(((1 / 2 + 10 / 13) / 2 + 1) / 2)
    assert r["map"] == pytest.approx((0.625 + 1.0) / 2)  # AP is per image, then averaged
    assert r["miou_conceptattention_protocol"] == pytest.approx(17 / 23)  # 17 / (40 - 17)
    assert r["n_images"] == 2


def test_prediction_threshold_is_strict_mean():
    # Normalised heat [0, .5, 1, .5] has mean exactly .5: strict ">" keeps only the 1.
    heat = np.array([[0.0, 0.5], [1.0, 0.5]])
    assert mean_threshold(heat).tolist() == [[False, False], [True, False]]
    m = BinarySegmentationMeter()
    assert m.update(heat, [[0, 0], [1, 0]])["acc"] == 1.0  # ">=" would give 2/4


def test_constant_heat_predicts_nothing():
    # Constant map -> all zeros -> nothing above the mean; AP with all scores tied = prevalence.
    m = BinarySegmentationMeter()
    per = m.update(np.full((2, 2), 3.0), [[1, 0], [0, 0]])
    assert per["acc"] == 0.75 and per["iou_fg"] == 0.0 and per["ap"] == 0.25
    assert minmax_normalize(np.full((3, 3), -2.0)).tolist() == [[0.0] * 3] * 3


def test_map_skips_images_without_foreground():
    m = BinarySegmentationMeter()
    m.update(HEAT_4x4, GT_4x4)                      # AP 0.625
    m.update(HEAT_4x4, np.zeros((4, 4), dtype=int))  # no positive: skipped for mAP only
    r = m.compute()
    assert r["map"] == pytest.approx(0.625)
    assert (r["n_map_images"], r["n_map_skipped"], r["n_images"]) == (1, 1, 2)
    # Pixel metrics still count it: second image has 4 FP and 12 TN -> correct 13 + 12 of 32.
    assert r["acc"] == pytest.approx(25 / 32)


def test_invariant_to_positive_affine_heat_and_input_types():
    rng = np.random.default_rng(0)
    heat = rng.normal(size=(9, 7))
    gt = rng.random((9, 7)) > 0.6
    ref = BinarySegmentationMeter()
    ref.update(heat, gt)
    for h, g in [(3 * heat + 5, gt),
                 (torch.from_numpy(heat), torch.from_numpy(gt)),
                 (torch.from_numpy(heat).float(), torch.from_numpy(gt).to(torch.uint8)),
                 (heat, gt.astype(np.float32))]:
        m = BinarySegmentationMeter()
        m.update(h, g)
        for k, v in ref.compute().items():
            assert m.compute()[k] == pytest.approx(v, abs=1e-6), k
    # A negated heat ranks the other way round and must change the result.
    neg = BinarySegmentationMeter()
    neg.update(-heat, gt)
    assert neg.compute()["map"] != pytest.approx(ref.compute()["map"])


def test_bfloat16_heat_is_accepted():
    m = BinarySegmentationMeter()
    m.update(torch.tensor(HEAT_4x4, dtype=torch.bfloat16), torch.tensor(GT_4x4).bool())
    assert m.compute()["acc"] == pytest.approx(13 / 16)


def test_conceptattention_protocol_equals_acc_over_2_minus_acc():
    rng = np.random.default_rng(1)
    m = BinarySegmentationMeter()
    for _ in range(20):
        h, w = rng.integers(3, 30, size=2)
        m.update(rng.random((h, w)) ** 3, rng.random((h, w)) > rng.random())
    r = m.compute()
    assert r["miou_conceptattention_protocol"] == pytest.approx(r["acc"] / (2 - r["acc"]), rel=1e-12)
    assert r["miou_conceptattention_protocol"] != pytest.approx(r["miou"], abs=1e-3)  # different numbers


# ----------------------------------------------------------------------------- average precision

def ap_brute_force(scores, labels):
    """Loop over distinct thresholds high to low, counting TP/FP directly."""
    scores, labels = list(np.ravel(scores)), list(np.ravel(labels).astype(bool))
    n_pos = sum(labels)
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, labels) if s >= t and y)
        fp = sum(1 for s, y in zip(scores, labels) if s >= t and not y)
        recall = tp / n_pos
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return ap


def test_ap_hand_values():
    # scikit-learn's documented example of average_precision_score: 0.83...
    # thresholds .8 -> P1 R1/2; .4 -> P1/2 R1/2; .35 -> P2/3 R1; AP = 1/2 + 1/2*2/3 = 5/6.
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(5 / 6)
    # Ties: .9 -> P1 R1/2; the tied pair .8 enters at once -> TP2 FP1, P2/3 R1. AP = 5/6 as well;
    # ranking the tied positive first would give 1/2 + 1/2*1 = 1, last would give 1/2 + 1/2*2/3.
    assert average_precision([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # Tie that splits differently: [1,1,0] at .5 with a positive at .2: .5 -> TP1 FP1 (P1/2 R1/2);
    # .2 -> TP2 FP1 (P2/3 R1). AP = 1/4 + 1/3 = 7/12.
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(7 / 12)
    assert average_precision([3, 2, 1], [1, 1, 0]) == 1.0
    assert average_precision([1, 2, 3], [1, 1, 0]) == pytest.approx(1 / 2 * 1 / 2 + 1 / 2 * 2 / 3)
    assert math.isnan(average_precision([1, 2], [0, 0]))


def test_ap_matches_brute_force_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(50):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 5, size=n).astype(float)  # heavy ties
        labels = rng.random(n) > 0.5
        if not labels.any():
            labels[0] = True
        assert average_precision(scores, labels) == pytest.approx(ap_brute_force(scores, labels), abs=1e-12)


def test_ap_matches_rank_formula_without_ties():
    # Without ties AP = mean over positives of precision at the positive's rank.
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.permutation(40).astype(float)
        labels = rng.random(40) > 0.7
        labels[0] = True
        ranks = np.argsort(np.argsort(-scores)) + 1  # 1 = highest score
        pos_ranks = np.sort(ranks[labels])
        expected = np.mean([(i + 1) / r for i, r in enumerate(pos_ranks)])
        assert average_precision(scores, labels) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- multi-concept

def two_concept_case():
    # Concept A: rows 0-1, cols 0-1. Concept B: rows 0-1, cols 2-3 plus (1,1), which A also has.
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True
    b = np.zeros((4, 4), bool)
    b[:2, 2:] = True
    b[1, 1] = True
    # Heat for A (max 8): row0 [1 1 .25 0], row1 [1 .5 1 0], (3,3) .5 (outside R).
    ha = np.zeros((4, 4))
    ha[0] = [8, 8, 2, 0]
    ha[1] = [8, 4, 8, 0]
    ha[3, 3] = 4
    # Heat for B (max 6): row0 [0 1/3 1 1], row1 [0 1 1 1/3].
    hb = np.zeros((4, 4))
    hb[0] = [0, 2, 6, 6]
    hb[1] = [0, 6, 6, 2]
    return np.stack([ha, hb]), np.stack([a, b])


# Target A: mean over the WHOLE image = (1+1+.25+1+.5+1+.5)/16 = 5.25/16 = .328 -> on: A's 4 pixels,
#   (1,2) and (3,3). M_c = A (4 px); M_other = B minus A = (0,2) (0,3) (1,2) (1,3).
#   In R: TP 4, FN 0, FP 1 (1,2), TN 3. Acc_fg 7/8; IoU_t 4/5; IoU_o 3/4; mIoU_fg .775.
#   AP in R: target scores 1,1,1,.5; others .25,0,1,0 -> t=1: TP3 FP1 (P3/4 R3/4);
#   t=.5: TP4 FP1 (P4/5 R1). AP = 9/16 + 1/4*4/5 = .7625.
#   NAR = (.25+0+1+0) / (1+1+1+.5 + 1.25) = 1.25/4.75 = 5/19.
#   (A mean taken inside R, 4.75/8 = .59, would switch (1,1) off: the test pins the whole-image mean.)
# Target B: mean = (14/3)/16 = .29 -> on: (0,1) (0,2) (0,3) (1,1) (1,2) (1,3).
#   M_c = B (5 px, includes (1,1)); M_other = A minus B = (0,0) (0,1) (1,0).
#   In R: TP 5, FN 0, FP 1 (0,1), TN 2. Acc_fg 7/8; IoU_t 5/6; IoU_o 2/3; mIoU_fg 3/4.
#   AP: target 1,1,1,1,1/3; others 0,1/3,0 -> t=1: P1 R4/5; t=1/3: TP5 FP1 (P5/6 R1). AP = .8 + 1/6.
#   NAR = (1/3) / (4 + 1/3 + 1/3) = 1/14.
PAIR_A = dict(acc_fg=7 / 8, iou_fg_target=4 / 5, iou_fg_other=3 / 4, miou_fg=0.775, map_fg=0.7625, nar=5 / 19)
PAIR_B = dict(acc_fg=7 / 8, iou_fg_target=5 / 6, iou_fg_other=2 / 3, miou_fg=0.75, map_fg=0.8 + 1 / 6, nar=1 / 14)


def test_multi_concept_by_hand():
    heats, masks = two_concept_case()
    m = MultiConceptMeter()
    per = m.update(heats, masks)
    for got, want in zip(per, (PAIR_A, PAIR_B)):
        for k, v in want.items():
            assert got[k] == pytest.approx(v), k
    r = m.compute()
    for k in PAIR_A:
        assert r[k] == pytest.approx((PAIR_A[k] + PAIR_B[k]) / 2), k
    assert (r["n_pairs"], r["n_skipped_pairs"], r["n_images"]) == (2, 0, 1)


def test_multi_concept_accepts_torch():
    heats, masks = two_concept_case()
    m = MultiConceptMeter()
    m.update(torch.from_numpy(heats).float(), torch.from_numpy(masks))
    assert m.compute()["nar"] == pytest.approx((5 / 19 + 1 / 14) / 2)


def test_multi_concept_averages_over_pairs_not_images():
    heats, masks = two_concept_case()
    m = MultiConceptMeter()
    m.update(heats, masks)  # pairs A, B
    # Image 2 (K=1 for simplicity is not a confusion case, so use 2 concepts, one with an empty mask):
    # target = perfectly separated pixel, the other concept absent -> M_other empty, R = M_c.
    h2 = np.zeros((2, 2, 2))
    h2[0, 0, 0] = 1.0
    m2 = np.zeros((2, 2, 2), bool)
    m2[0, 0, 0] = True
    per = m.update(h2, m2)
    assert per[1] is None  # empty target mask: skipped
    # Pair C: R = {(0,0)}, on, TP1 -> acc 1, IoU_t 1, IoU_o undefined (empty union) -> mIoU_fg 1,
    # AP 1, NAR 0/1 = 0.
    r = m.compute()
    assert (r["n_pairs"], r["n_skipped_pairs"], r["n_images"]) == (3, 1, 2)
    assert r["miou_fg"] == pytest.approx((0.775 + 0.75 + 1) / 3)  # per image first would be (.7625+1)/2
    assert r["nar"] == pytest.approx((5 / 19 + 1 / 14 + 0) / 3)
    assert r["iou_fg_other"] == pytest.approx((3 / 4 + 2 / 3) / 2)  # undefined pair left out


def test_nar_zero_mass_is_zero():
    # Heat only outside R: H_c = 0 on all of R -> 0/0 -> NAR 0, counted; all of R predicted off.
    heat = np.zeros((3, 3))
    heat[2, 2] = 1.0
    target = np.zeros((3, 3), bool)
    target[0, 0] = True
    other = np.zeros((3, 3), bool)
    other[0, 1] = True
    res = confusion_pair_metrics(heat, target, other)
    assert res["nar"] == 0.0 and res["nar_zero_mass"]
    assert res["iou_fg_target"] == 0.0 and res["iou_fg_other"] == 1 / 2 and res["acc_fg"] == 1 / 2
    m = MultiConceptMeter()
    m.update(np.stack([heat, heat]), np.stack([target, other]))
    assert m.compute()["n_nar_zero_mass"] == 2


def multi_brute_force(heat, masks, k):
    """Eq. 14 for target k written pixel by pixel."""
    hn = (heat - heat.min()) / (heat.max() - heat.min())
    thr = hn.mean()
    c = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    mass_other = mass_r = 0.0
    scores, labels = [], []
    for i in range(heat.shape[0]):
        for j in range(heat.shape[1]):
            in_c = bool(masks[k, i, j])
            in_other = not in_c and any(masks[q, i, j] for q in range(len(masks)) if q != k)
            if not (in_c or in_other):
                continue
            on = hn[i, j] > thr
            c[("t" if on == in_c else "f") + ("p" if on else "n")] += 1
            mass_r += hn[i, j]
            mass_other += hn[i, j] if in_other else 0.0
            scores.append(hn[i, j])
            labels.append(in_c)
    n = sum(c.values())
    iou_t = c["tp"] / (c["tp"] + c["fp"] + c["fn"])
    iou_o = c["tn"] / (c["tn"] + c["fp"] + c["fn"])
    return dict(acc_fg=(c["tp"] + c["tn"]) / n, miou_fg=(iou_t + iou_o) / 2,
                map_fg=ap_brute_force(scores, labels), nar=mass_other / mass_r)


def test_multi_concept_matches_brute_force_with_overlaps():
    rng = np.random.default_rng(4)
    for _ in range(10):
        heats = rng.random((3, 6, 5)) ** 2
        masks = rng.random((3, 6, 5)) > 0.6  # overlapping masks on purpose
        masks[:, 0, 0] = [True, False, False]
        masks[:, 0, 1] = [False, True, False]  # every concept present, every M_other non-empty
        masks[:, 0, 2] = [False, False, True]
        per = MultiConceptMeter().update(heats, masks)
        for k in range(3):
            want = multi_brute_force(heats[k], masks, k)
            for key, v in want.items():
                assert per[k][key] == pytest.approx(v, abs=1e-12), key


# ----------------------------------------------------------------------------- errors

def test_errors():
    m = BinarySegmentationMeter()
    with pytest.raises(ValueError, match="no images"):
        m.compute()
    with pytest.raises(ValueError, match="does not match"):
        m.update(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="2-D"):
        m.update(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="binary"):
        m.update(np.zeros((2, 2)), np.array([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="binary"):
        m.update(np.zeros((2, 2)), np.array([[0, 0.5], [1, 0]]))
    with pytest.raises(ValueError, match="NaN"):
        m.update(np.array([[0, np.nan], [1, 0]]), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="empty"):
        m.update(np.zeros((0, 3)), np.zeros((0, 3)))
    assert m.n_images == 0  # failed updates leave the meter untouched
    with pytest.raises(ValueError, match="differ in size"):
        average_precision([1, 2, 3], [1, 0])

    mm = MultiConceptMeter()
    with pytest.raises(ValueError, match="no image-concept pairs"):
        mm.compute()
    with pytest.raises(ValueError, match="does not match"):
        mm.update(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="3-D"):
        mm.update(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="empty"):
        mm.update(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))
    mm.update(np.ones((2, 3, 3)), np.zeros((2, 3, 3)))  # every target empty: all skipped
    with pytest.raises(ValueError, match="no image-concept pairs"):
        mm.compute()


# ----------------------------------------------------------------------------- command-line harness

def write_dataset(tmp_path):
    heats, masks = two_concept_case()
    np.savez(tmp_path / "a.npz", heat=HEAT_4x4, gt=GT_4x4)  # [H, W] -> K = 1
    np.savez(tmp_path / "b.npz", heat=heats.astype(np.float32), gt=masks, concepts=np.array(["cat", "dog"]))
    (tmp_path / "notes.txt").write_text("ignored")


def test_evaluate_json(tmp_path, capsys):
    from anchordiff_core.evaluate import main

    write_dataset(tmp_path)
    assert main([str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_files"] == 2
    # Binary table scores 3 maps: the 4x4 image and each of b.npz's concepts over its whole image.
    ref = BinarySegmentationMeter()
    heats, masks = two_concept_case()
    for h, g in [(HEAT_4x4, GT_4x4), (heats[0], masks[0]), (heats[1], masks[1])]:
        ref.update(h, g)
    assert res["binary"]["n_images"] == 3
    for k, v in ref.compute().items():
        assert res["binary"][k] == pytest.approx(v), k
    # Multi-concept only from b.npz: the two hand-computed pairs.
    mc = res["multi_concept"]
    assert (mc["n_images"], mc["n_pairs"]) == (1, 2)
    for k in ("miou_fg", "map_fg", "acc_fg", "nar"):
        assert mc[k] == pytest.approx((PAIR_A[k] + PAIR_B[k]) / 2), k


def test_evaluate_table_and_module_entry_point(tmp_path):
    write_dataset(tmp_path)
    out = subprocess.run([sys.executable, "-m", "anchordiff_core.evaluate", str(tmp_path)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout
    assert "mIoU(ConceptAttention protocol = Acc/(2-Acc))" in out
    assert "mIoU_fg  mAP_fg  Acc_fg     NAR" in out
    nar = 100 * (5 / 19 + 1 / 14) / 2  # 16.73
    assert f"{nar:6.2f}" in out.splitlines()[-1]


def test_evaluate_single_concept_only_has_no_multi_table(tmp_path, capsys):
    from anchordiff_core.evaluate import main

    np.savez(tmp_path / "a.npz", heat=HEAT_4x4, gt=GT_4x4)
    np.savez(tmp_path / "z.npz", heat=HEAT_4x4, gt=np.zeros((4, 4), bool))  # no foreground
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Multi-concept" not in out
    assert "mAP over 1; 1 without foreground skipped" in out
    assert main([str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["multi_concept"] is None


@pytest.mark.parametrize("arrays, message", [
    ({}, "no .npz files"),
    ({"heat": np.zeros((4, 4))}, "missing array"),
    ({"heat": np.zeros((2, 4, 4)), "gt": np.zeros((2, 4, 5))}, "must both be"),
    ({"heat": np.zeros((2, 4, 4)), "gt": np.zeros((2, 4, 4)), "concepts": np.array(["x"])}, "1 concept names for K = 2"),
    ({"heat": np.zeros((4, 4)), "gt": np.full((4, 4), 3)}, "bad.npz: .*binary"),
])
def test_evaluate_errors(tmp_path, capsys, arrays, message):
    from anchordiff_core.evaluate import main

    if arrays:
        np.savez(tmp_path / "bad.npz", **arrays)
    assert main([str(tmp_path)]) == 2
    assert re.search(message, capsys.readouterr().err)
