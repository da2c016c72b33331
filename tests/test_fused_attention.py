"""The Triton head-mean kernels (anchordiff_core/fused_attention.py) run by triton's CPU interpreter
(TRITON_INTERPRET=1) against the exact float32 recorder, and the recorder's fast mode through them.

On CUDA the same kernel code runs compiled; what the interpreter cannot show is the GPU's own
rounding (TF32 products on float32 / widened bf16 tiles, fp16 tensor cores), which these tolerances
leave room for, and its speed. Triton is a test requirement (requirements/test.txt)."""
import numpy as np
import pytest
import torch

import triton  # noqa: F401  imported here without TRITON_INTERPRET, as a fast recording on a CPU does first

import reference_recorder as ref
from anchordiff_core import attention
from anchordiff_core.recorder import RecordSpec, StepRecorder
from triton_interpreter import interpreted_kernels


@pytest.fixture
def fused():
    """The kernels module imported afresh under TRITON_INTERPRET=1 (tests/triton_interpreter.py)."""
    with interpreted_kernels() as module:
        yield module


def qkv(b, n, heads, d, dtype, seed, gain=2.0, length=None):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, length or n, heads * d, generator=g) * gain).to(dtype) for _ in range(3)]


def exact_a(q, k, v, heads):
    return attention.image_self_attention(q, k, v, heads, precision="exact")[0]


# (batch, tokens, heads, head dim): tokens not a multiple of the 32 x 32 interpreter tile, a head
# dim that is not a power of two (padded tiles), and SD3's head dim 64
SHAPES = [(2, 70, 3, 24), (1, 33, 2, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_head_mean_kernel_equals_the_exact_recorder(fused, shape, dtype):
    b, n, heads, d = shape
    q, k, v = qkv(b, n, heads, d, dtype, seed=n + heads)
    got = fused.head_mean_probs(q, k, heads)
    want = exact_a(q, k, v, heads)  # float32 from the same (rounded) inputs
    assert got.dtype == torch.float32 and got.shape == (b, n, n)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=2e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(b, n), atol=1e-5, rtol=0)  # rows are distributions
    assert want.amax() > 0.3  # peaked rows: a wrong head offset or lse shows
    lse = fused.row_logsumexp(q, k, heads)
    qh, kh = (t.double().view(b, n, heads, d).transpose(1, 2) for t in (q, k))
    torch.testing.assert_close(lse.double(), (qh @ kh.transpose(-1, -2) / d**0.5).logsumexp(-1), atol=2e-5, rtol=1e-6)


def test_head_mean_kernel_equals_the_numpy_transcription(fused):
    b, n, heads, d = 1, 40, 3, 16
    q, k, v = qkv(b, n, heads, d, torch.float32, seed=5)
    got = fused.head_mean_probs(q, k, heads)[0].numpy()
    want = ref.block_maps(q[0], k[0], v[0], q[0], k[0][:2], q[0][:2], k[0][:2], v[0][:2], heads, np.array([0, 0]), 1)["a_ii"]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


def test_head_mean_kernel_writes_a_strided_compact_slot_only(fused):
    """The recorder's store: slot 1 of a [B, G, N, N] float16 buffer; float32 sums rounded once."""
    b, n, heads, d = 2, 45, 2, 16
    q, k, v = qkv(b, n, heads, d, torch.bfloat16, seed=9)
    store = torch.full((b, 2, n, n), float("nan"), dtype=torch.float16)
    fused.head_mean_probs(q, k, heads, out=store[:, 1])
    assert torch.isnan(store[:, 0]).all()
    want = exact_a(q, k, v, heads)
    assert torch.equal(store[:, 1], want.half()) or (store[:, 1].float() - want).abs().max() <= 2**-11 * want.abs().max()
    assert (store[:, 1].float() - want).abs().max() > 0  # really rounded: a float16 store


def test_bad_inputs_are_refused_with_what_to_do(fused):
    q = torch.zeros(1, 8, 6)
    with pytest.raises(ValueError, match="divisible"):
        fused.head_mean_probs(q, q, 4)
    with pytest.raises(ValueError, match="lse must be"):
        fused.head_mean_probs(q, q, 2, lse=torch.zeros(1, 2, 7))


def test_kernels_are_chosen_only_where_they_run(fused, monkeypatch):
    assert attention.fused_kernels(torch.device("cpu")) is fused  # interpreter on
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not fused.interpreted()
    assert attention.fused_kernels(torch.device("cpu")) is None  # compiled kernels: CUDA only
    assert attention.fused_kernels(torch.device("cuda")) is fused
    monkeypatch.setenv("ANCHORDIFF_TRITON", "0")
    assert attention.fused_kernels(torch.device("cuda")) is None


HEADS, D, N, TEXT = 2, 32, 40, 5


def _blocks(seed, count=3):
    """Per joint block the recorder's inputs (q/k/v/out of the image, prompt keys, concept q/k/v) for 2 rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = (N, N, N, N, TEXT, 3, 3, 3)
    return [[torch.randn(2, length, HEADS * D, generator=g) * 1.5 for length in lengths] for _ in range(count)]


def _record(precision, blocks, graph_layers=(0, 2), seg4diff_layer=2, model_dtype=torch.bfloat16):
    spec = RecordSpec(("cat", "red car"), torch.tensor([0, 1, 1]), len(blocks), graph_layers, seg4diff_layer, precision=precision)
    step = StepRecorder(spec, HEADS)
    for index, inputs in enumerate(blocks):
        step.record_block(index, *[t.to(model_dtype) for t in inputs])
    return step.finish(torch.tensor([0, 1]), 2, grid=(5, 8), image_size=(40, 64), sigma=0.5, step=1)


def test_fast_recorder_uses_the_kernels_and_matches_exact(fused, monkeypatch):
    calls = []
    real = fused.head_mean_probs
    monkeypatch.setattr(fused, "head_mean_probs", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    blocks = _blocks(seed=3)
    exact, fast, compact = _record("exact", blocks), _record("fast", blocks), _record("compact", blocks)
    assert len(calls) == 4  # both graph layers through the kernel, in fast and in compact
    assert exact.a_ii.dtype == torch.float32 and exact.o_ii.dtype == torch.float32
    assert fast.a_ii.dtype == torch.float32 and fast.o_ii.dtype == torch.bfloat16
    assert compact.a_ii.dtype == torch.float16 and compact.o_ii.dtype == torch.bfloat16
    torch.testing.assert_close(fast.a_ii, exact.a_ii, atol=1e-6, rtol=2e-5)
    # compact: the float16 store's rounding (11 significant bits; absolute 2^-25 below 2^-14)
    err = (compact.a_ii.float() - exact.a_ii).abs()
    assert bool((err <= 2**-11 * exact.a_ii.abs() + 2**-24).all()), err.max()
    assert err.max() > 0
    # Seg4Diff on a graph layer: read from the kernel's row log-sum-exp
    torch.testing.assert_close(fast.seg4diff, exact.seg4diff, atol=1e-6, rtol=1e-5)
    assert exact.seg4diff.amax() > 0.05
    for name in ("a_ci", "ca_scores"):
        assert torch.equal(getattr(fast, name), getattr(exact, name)), name
    # the graph's input: float32 layer mean of the compact store, as build_gated_graph would average
    (a_mean,), (o_mean,) = compact.graph_inputs(1)
    assert a_mean.dtype == torch.float32 and o_mean.dtype == torch.float32
    torch.testing.assert_close(a_mean, compact.a_ii[1].float().mean(0), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(o_mean, compact.o_ii[1].float().mean(0), atol=1e-6, rtol=1e-6)
    assert exact.graph_inputs(1)[0][0].data_ptr() == exact.a_ii[1, 0].data_ptr()  # exact: views, no copy


def test_fast_seg4diff_on_a_layer_without_a_ii_uses_the_log_sum_exp_kernel(fused, monkeypatch):
    calls = []
    real = fused.row_logsumexp
    monkeypatch.setattr(fused, "row_logsumexp", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    blocks = _blocks(seed=8)
    exact = _record("exact", blocks, graph_layers=(2,), seg4diff_layer=1)
    fast = _record("fast", blocks, graph_layers=(2,), seg4diff_layer=1)
    assert len(calls) == 2  # the Seg4Diff layer and the graph layer
    torch.testing.assert_close(fast.seg4diff, exact.seg4diff, atol=1e-6, rtol=1e-5)
    assert exact.seg4diff.amax() > 0.05


def test_kernels_that_fail_on_a_gpu_fall_back_head_by_head_with_one_warning(fused, monkeypatch):
    """A triton or GPU the kernels do not support (compile error at the first launch): one warning,
    the same maps head by head, and no second try; in the interpreter the error is raised."""
    monkeypatch.setattr(attention, "_fused_failure", None)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PTX assembly failed (planted)")

    monkeypatch.setattr(fused, "row_logsumexp", broken)
    q, k, v = qkv(1, 33, 2, 64, torch.float32, seed=3)
    with pytest.raises(RuntimeError, match="planted"):  # interpreted: a test sees the error itself
        attention.image_self_attention(q, k, v, 2, precision="fast")
    monkeypatch.setattr(fused, "interpreted", lambda: False)
    monkeypatch.setattr(fused, "usable_on", lambda device: True)  # as on a GPU
    with pytest.warns(RuntimeWarning, match="fused Triton attention kernels failed on this GPU.*planted"):
        a, o, _ = attention.image_self_attention(q, k, v, 2, precision="fast")
    torch.testing.assert_close(a, exact_a(q, k, v, 2), atol=1e-6, rtol=1e-5)
    assert calls == [1, 1]
    attention.image_self_attention(q, k, v, 2, precision="fast")
    columns = attention.image_and_extra_key_columns(q, k, k[:, :4], torch.tensor([1, 2]), 2, precision="fast")
    assert calls == [1, 1] and columns.shape == (1, 33, 2)  # never tried again
