"""Graph, gate, propagation and masks against the dense numpy reference and synthetic scenes."""
import numpy as np
import pytest
import torch

import anchordiff_core as ad
import reference_numpy as ref
from synthetic import look_alike_scene


def random_inputs(n, d, seed, sharpness=3.0):
    """Random A_II (softmax rows) and O_II whose gate has no entry within 1e-6 of tau.

    float32 vs float64 rounding can only flip a gate entry that sits within ~1e-7 of tau; such
    inputs are skipped deterministically so the comparison tests the algorithm, not rounding.
    """
    for offset in range(50):
        g = torch.Generator().manual_seed(seed * 1000 + offset)
        a = torch.softmax(torch.randn(n, n, generator=g) * sharpness, dim=1)
        o = torch.randn(n, d, generator=g) + 0.5
        w = ref.cosine_rows(a.numpy())
        tau = np.percentile(w, 98.0)
        others = np.abs(w - tau)[w != tau]
        if others.min() > 1e-6:
            return a, o
    raise AssertionError("no well-separated random input found")


@pytest.mark.parametrize("n,d", [(64, 16), (144, 40), (400, 24)])
def test_sparse_propagation_matches_dense_reference(n, d):
    a, o = random_inputs(n, d, seed=n)
    graph = ad.build_gated_graph(a, o, gate_percentile=98.0)
    anchors = torch.tensor([0, n // 3, n - 1])
    heat = ad.propagate(graph, anchors, steps=160)

    w_hat, tau, _ = ref.gated_transition(a.numpy(), o.numpy(), 98.0)
    expected = ref.propagate(w_hat, ref.one_hot(anchors.numpy(), n), 160)
    assert graph.tau == pytest.approx(tau, rel=0, abs=1e-6)
    assert heat.shape == (3, n) and heat.dtype == torch.float32
    np.testing.assert_allclose(heat.numpy(), expected, atol=1e-5, rtol=0)
    # the sparse transition matrix is exactly the reference's W_hat^T, entry by entry
    np.testing.assert_allclose(graph.transition_t.to_dense().numpy(), w_hat.T, atol=1e-6, rtol=0)


def test_graph_keeps_only_the_gated_fraction():
    a, o = random_inputs(400, 24, seed=7)
    graph = ad.build_gated_graph(a, o, 98.0)
    # at most 2% of N^2 pass the gate; entries with non-positive W_cos are dropped on top
    assert 0 < graph.num_edges <= 0.02 * 400 * 400 + 1
    assert graph.transition_t.layout == torch.sparse_csr


def test_seed_tensor_and_multi_anchor_forms_agree_with_reference():
    n = 144
    a, o = random_inputs(n, 16, seed=3)
    graph = ad.build_gated_graph(a, o)
    w_hat, _, _ = ref.gated_transition(a.numpy(), o.numpy())
    multi = torch.tensor([[5, 90], [30, -1]])
    seeds = np.zeros((2, n))
    seeds[0, [5, 90]] = 1
    seeds[1, 30] = 1
    expected = ref.propagate(w_hat, seeds, 160)
    np.testing.assert_allclose(ad.propagate(graph, multi).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(ad.propagate(graph, torch.tensor(seeds, dtype=torch.float32)).numpy(), expected, atol=1e-5)


def test_no_gate_ablation_matches_reference():
    n = 64
    a, o = random_inputs(n, 8, seed=11)
    graph = ad.build_gated_graph(a, o, gate_percentile=None)
    w_hat, _, _ = ref.gated_transition(a.numpy(), o.numpy(), None)
    expected = ref.propagate(w_hat, ref.one_hot([4], n), 160)
    np.testing.assert_allclose(ad.propagate(graph, torch.tensor([4])).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("gate", [98.0, None])
def test_no_w_cos_ablation_matches_reference_and_differs_from_the_paper(gate):
    n = 144
    a, o = random_inputs(n, 16, seed=5)
    graph = ad.build_gated_graph(a, o, gate_percentile=gate, weights="attention")
    w_hat, tau, _ = ref.gated_transition(a.numpy(), o.numpy(), gate, weights="attention")
    np.testing.assert_allclose(graph.transition_t.to_dense().numpy(), w_hat.T, atol=1e-6, rtol=0)
    expected = ref.propagate(w_hat, ref.one_hot([4, 70], n), 160)
    np.testing.assert_allclose(ad.propagate(graph, torch.tensor([4, 70])).numpy(), expected, atol=1e-5)
    # O_II is not used at all, and the weights are not the paper's
    assert torch.equal(ad.build_gated_graph(a, o * -3 + 1, gate_percentile=gate, weights="attention").transition_t.to_dense(),
                       graph.transition_t.to_dense())
    paper = ad.build_gated_graph(a, o, gate_percentile=gate).transition_t.to_dense()
    assert (paper - graph.transition_t.to_dense()).abs().max() > 1e-3
    with pytest.raises(ValueError, match="weights must be one of"):
        ad.build_gated_graph(a, o, weights="cosine")


@pytest.mark.parametrize("size", [1, 2, 7, 1000, 4097])
@pytest.mark.parametrize("q", [0.0, 2.0, 37.5, 50.0, 97.5, 98.0, 99.99, 100.0])
def test_percentile_equals_numpy(size, q):
    values = torch.randn(size, generator=torch.Generator().manual_seed(size))
    expected = np.percentile(values.numpy().astype(np.float64), q)
    assert ad.percentile(values, q) == expected
    # numpy interpolates float32 input in float32: that answer may differ from the exact one by
    # a rounding error of the operands' size
    in_float32 = np.percentile(values.numpy(), q)
    assert abs(ad.percentile(values, q) - in_float32) <= 2 * np.spacing(np.abs(values.numpy()).max())


def test_percentile_with_ties_and_2d_input():
    values = torch.tensor([[1.0, 1.0, 2.0], [2.0, 2.0, 3.0]])
    for q in (10, 50, 90, 98):
        assert ad.percentile(values, q) == np.percentile(values.numpy().astype(np.float64), q)


def test_gate_uses_strict_inequality_at_tau():
    # identical rows: W_attn is 1 everywhere, so tau == 1 and only entries strictly above 1
    # would pass: none. Every row is then empty -> self-loops.  The rows are four entries of
    # 1/4 (zeros elsewhere): every product, partial sum and norm is a power of two, so W_attn
    # is exactly 1 in any summation order -- the ties do not depend on the CPU's BLAS.  (Rows
    # of 0.1 did: an AMD EPYC's BLAS summed them to 1 +- 1 ulp at some positions.)
    a = torch.zeros(10, 10)
    a[:, 2:6] = 0.25
    o = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    graph = ad.build_gated_graph(a, o, 50.0)
    assert graph.tau == 1.0
    assert torch.equal(graph.transition_t.to_dense(), torch.eye(10))
    heat = ad.propagate(graph, torch.tensor([3]))
    assert heat[0, 3] == 1 and heat[0].sum() == 1


# ---------------------------------------------------------------- synthetic look-alike scene
def test_gate_confines_propagation_to_the_anchored_object():
    a_ii, o_ii, region = look_alike_scene()
    is_a, is_b = region == 1, region == 2
    # raw output similarity links the look-alikes, row-wise attention does not
    w_cos = ad.cosine_similarity_rows(o_ii)
    w_attn = ad.cosine_similarity_rows(a_ii)
    assert w_cos[is_a][:, is_b].mean() > 0.8
    assert w_attn[is_a][:, is_b].abs().max() < 1e-6

    anchor = torch.tensor([int(torch.nonzero(is_a)[12])])  # middle of A
    gated = ad.propagate(ad.build_gated_graph(a_ii, o_ii, 98.0), anchor)
    mask = ad.to_mask(gated, (16, 16), (16, 16)).flatten().bool()
    iou_a = (mask & is_a).sum() / (mask | is_a).sum()
    assert iou_a > 0.8
    assert (mask & is_b).sum() == 0
    assert gated[0, is_b].sum() / gated[0].sum() < 0.01

    # the paper's ablation in miniature: without the gate, activation leaks onto B.
    # Non-target activation ratio (eq. 14) on the two objects:
    def nar(heat):
        return float(heat[0, is_b].sum() / heat[0, is_a | is_b].sum())

    ungated = ad.propagate(ad.build_gated_graph(a_ii, o_ii, None), anchor)
    assert nar(gated) < 0.01
    assert nar(ungated) > 0.3


# ---------------------------------------------------------------- dtypes, devices, errors
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    a, o = random_inputs(64, 8, seed=5)
    full = ad.propagate(ad.build_gated_graph(a, o), torch.tensor([1]))
    low = ad.propagate(ad.build_gated_graph(a.to(dtype).float(), o.to(dtype).float()), torch.tensor([1]))
    got = ad.propagate(ad.build_gated_graph(a.to(dtype), o.to(dtype)), torch.tensor([1]))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, low)  # same as rounding the inputs, then float32 math
    if dtype == torch.float32:
        torch.testing.assert_close(got, full)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    a, o = random_inputs(256, 16, seed=9)
    cpu = ad.propagate(ad.build_gated_graph(a, o), torch.tensor([3, 77]))
    gpu = ad.propagate(ad.build_gated_graph(a.cuda(), o.cuda()), torch.tensor([3, 77]).cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


def test_clear_errors_for_wrong_inputs():
    a, o = random_inputs(64, 4, seed=1)
    with pytest.raises(ValueError, match="square"):
        ad.build_gated_graph(a[:, :8], o)
    with pytest.raises(ValueError, match="one row per image token"):
        ad.build_gated_graph(a, o[:8])
    with pytest.raises(ValueError, match="2-D"):
        ad.build_gated_graph(a[None, None], o)
    with pytest.raises(ValueError, match="NaN"):
        ad.build_gated_graph(a * float("nan"), o)
    with pytest.raises(ValueError, match="percentile"):
        ad.build_gated_graph(a, o, 101.0)
    graph = ad.build_gated_graph(a, o)
    with pytest.raises(ValueError, match="out of range"):
        ad.propagate(graph, torch.tensor([64]))
    with pytest.raises(ValueError, match=r"\[K, 64\]"):
        ad.propagate(graph, torch.ones(2, 15))
    with pytest.raises(ValueError, match="at least one anchor"):
        ad.propagate(graph, torch.tensor([[-1, -1]]))
    with pytest.raises(ValueError, match="steps"):
        ad.propagate(graph, torch.tensor([0]), steps=-1)


def test_propagation_callback_reports_progress_and_can_stop():
    a, o = random_inputs(64, 8, seed=2)
    graph = ad.build_gated_graph(a, o)
    seen = []
    ad.propagate(graph, torch.tensor([0]), steps=40, callback=lambda done, total: seen.append((done, total)))
    assert seen == [(16, 40), (32, 40), (40, 40)]

    class Stop(Exception):
        pass

    def stop(done, total):
        raise Stop

    with pytest.raises(Stop):
        ad.propagate(graph, torch.tensor([0]), steps=40, callback=stop)


def test_minmax_of_constant_rows_is_zero_not_nan():
    out = ad.minmax_rows(torch.tensor([[2.0, 2.0, 2.0], [0.0, 1.0, 3.0]]))
    assert torch.equal(out[0], torch.zeros(3))
    torch.testing.assert_close(out[1], torch.tensor([0.0, 1 / 3, 1.0]))


def test_gate_is_symmetric_even_when_tau_falls_on_a_pair():
    # W_attn is symmetric, so the 98th percentile often equals a pair of entries exactly:
    # strict '>' must drop both copies, never just one because of rounding.
    for seed in range(5):
        a, o = random_inputs(144, 16, seed=seed)
        pattern = ad.build_gated_graph(a, o).transition_t.to_dense() > 0
        assert torch.equal(pattern, pattern.T), seed


# ---------------------------------------------------------------- layers, interruption, threads
def test_layers_are_averaged_without_a_stacked_copy():
    a1, o1 = random_inputs(100, 8, seed=11)
    a2, o2 = random_inputs(100, 8, seed=12)
    mean = ad.build_gated_graph((a1 + a2) / 2, (o1 + o2) / 2)
    for form in ((a1, a2), torch.stack([a1, a2])):
        got = ad.build_gated_graph(form, torch.stack([o1, o2]))
        assert got.tau == mean.tau
        torch.testing.assert_close(got.transition_t.to_dense(), mean.transition_t.to_dense(), atol=1e-6, rtol=0)


def test_graph_build_checks_for_interruption_between_chunks(monkeypatch):
    import anchordiff_core.graph as graph_module

    a, o = random_inputs(400, 24, seed=4)
    expected = ad.build_gated_graph(a, o)
    monkeypatch.setattr(graph_module, "_work_per_chunk", lambda device: 300 * 300 * 400)  # small chunks
    calls = []
    got = ad.build_gated_graph(a, o, interrupt=lambda: calls.append(1))
    assert len(calls) >= 6  # W_attn tiles, percentile passes, W row blocks
    torch.testing.assert_close(got.transition_t.to_dense(), expected.transition_t.to_dense(), atol=1e-6, rtol=0)

    class Stop(Exception):
        pass

    def stop_at_third():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    calls.clear()
    with pytest.raises(Stop):
        ad.build_gated_graph(a, o, interrupt=stop_at_third)
    assert len(calls) == 3  # nothing ran after the interruption


def test_the_layer_mean_checks_for_interruption(monkeypatch):
    """Several layers are averaged in blocks of rows with checks between them (at 2048 x 2048 the
    two 1 GiB layers take about a second: the largest gap of the whole build before)."""
    import anchordiff_core.graph as graph_module

    (a1, o1), (a2, o2) = random_inputs(400, 8, seed=21), random_inputs(400, 8, seed=22)
    expected = ad.build_gated_graph((a1 + a2) / 2, (o1 + o2) / 2)
    monkeypatch.setattr(graph_module, "_chunk_elements", lambda device: 400 * 10)  # 80 rows per block
    calls, at_cosines = [], []
    original = graph_module._attention_cosines
    monkeypatch.setattr(graph_module, "_attention_cosines", lambda a, check: at_cosines.append(len(calls)) or original(a, check))
    got = ad.build_gated_graph((a1, a2), (o1, o2), interrupt=lambda: calls.append(1))
    assert at_cosines == [5]  # one check per block of the mean, before W_attn starts
    assert got.tau == expected.tau
    torch.testing.assert_close(got.transition_t.to_dense(), expected.transition_t.to_dense(), atol=1e-6, rtol=0)


def test_interrupt_checks_are_under_a_cpu_second_apart_at_2048_tokens():
    import time

    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(2048, 2048, generator=g) * 3, dim=1)
    o = torch.randn(2048, 256, generator=g)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # all work on this thread, so thread CPU time measures it
    stamps = [time.thread_time()]
    try:
        ad.build_gated_graph(a, o, interrupt=lambda: stamps.append(time.thread_time()))
    finally:
        torch.set_num_threads(previous_threads)
    stamps.append(time.thread_time())
    gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    assert len(gaps) >= 4 and max(gaps) < 1.0, gaps


def test_propagation_runs_on_one_cpu_thread_and_restores_the_setting():
    a, o = random_inputs(64, 8, seed=2)
    graph = ad.build_gated_graph(a, o)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        ad.propagate(graph, torch.tensor([0]), steps=16, callback=lambda done, total: seen.append(torch.get_num_threads()))
        assert seen == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
