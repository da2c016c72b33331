"""Chunked attention helpers against naive per-head computations."""
import numpy as np
import pytest
import torch

import anchordiff_core as ad
import reference_numpy as ref


def qkv(b, n, heads, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, heads * d, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 37 * 4 * 5, 1 << 30])
def test_chunked_image_attention_equals_naive(chunk_bytes):
    q, k, v = qkv(2, 37, 3, 8)
    a, o, extra = ad.image_self_attention(q, k, v, heads=3, max_chunk_bytes=chunk_bytes)
    assert extra is None
    a_ref, o_ref = ref.head_averaged_attention(q.numpy(), k.numpy(), v.numpy(), 3)
    assert a.shape == (2, 37, 37) and o.shape == (2, 37, 24) and a.dtype == torch.float32
    np.testing.assert_allclose(a.numpy(), a_ref, atol=1e-6)
    np.testing.assert_allclose(o.numpy(), o_ref, atol=1e-5)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 37))


def test_image_attention_from_half_precision_inputs():
    q, k, v = qkv(1, 20, 2, 8, dtype=torch.bfloat16)
    a, o, _ = ad.image_self_attention(q, k, v, heads=2)
    a_ref, o_ref = ref.head_averaged_attention(q.float().numpy(), k.float().numpy(), v.float().numpy(), 2)
    assert a.dtype == torch.float32
    np.testing.assert_allclose(a.numpy(), a_ref, atol=1e-6)
    np.testing.assert_allclose(o.numpy(), o_ref, atol=1e-5)


@pytest.mark.parametrize("chunk_bytes", [3 * 37 * 4 * 5, 1 << 30])
def test_extra_key_columns_read_from_the_same_scores(chunk_bytes):
    q, k, v = qkv(2, 37, 3, 8, seed=6)
    extra = qkv(2, 9, 3, 8, seed=7)[1] * 4  # larger logits than the image keys: exercises the shift
    columns = torch.tensor([6, 7, 8])
    a, o, got = ad.image_self_attention(q, k, v, 3, chunk_bytes, extra_keys=extra, extra_columns=columns)
    expected = ad.key_column_attention(q, torch.cat([k, extra], 1), columns + 37, heads=3)
    torch.testing.assert_close(got, expected)
    a_ref, _ = ref.head_averaged_attention(q.numpy(), k.numpy(), v.numpy(), 3)
    np.testing.assert_allclose(a.numpy(), a_ref, atol=1e-6)


def test_query_key_attention_is_head_mean_of_softmax():
    q, _, _ = qkv(2, 5, 4, 8, seed=1)
    _, k, _ = qkv(2, 30, 4, 8, seed=2)
    got = ad.query_key_attention(q, k, heads=4)
    qh = q.view(2, 5, 4, 8).transpose(1, 2)
    kh = k.view(2, 30, 4, 8).transpose(1, 2)
    expected = torch.softmax(qh @ kh.transpose(-1, -2) / 8**0.5, -1).mean(1)
    torch.testing.assert_close(got, expected)


def test_key_column_attention_reads_columns_of_the_full_softmax():
    q, _, _ = qkv(1, 33, 2, 8, seed=3)
    _, k, _ = qkv(1, 45, 2, 8, seed=4)
    cols = torch.tensor([40, 2, 44])
    got = ad.key_column_attention(q, k, cols, heads=2, max_chunk_bytes=2 * 45 * 4 * 4)
    full = ad.query_key_attention(q, k, heads=2)
    torch.testing.assert_close(got, full[:, :, cols])


def test_attention_output_matches_manual():
    q, k, v = qkv(1, 6, 2, 4, seed=5)
    got = ad.multihead_attention(q[:, :3], k, v, heads=2)
    p = torch.softmax(q[:, :3].view(1, 3, 2, 4).transpose(1, 2) @ k.view(1, 6, 2, 4).permute(0, 2, 3, 1) / 2.0, -1)
    expected = (p @ v.view(1, 6, 2, 4).transpose(1, 2)).transpose(1, 2).reshape(1, 3, 8)
    torch.testing.assert_close(got, expected)


def test_group_mean_averages_a_concepts_tokens():
    x = torch.tensor([[1.0, 10.0], [3.0, 20.0], [5.0, 30.0]])
    out = ad.group_mean(x, torch.tensor([0, 1, 0]), 2, dim=0)
    torch.testing.assert_close(out, torch.tensor([[3.0, 20.0], [3.0, 20.0]]))
    with pytest.raises(ValueError, match="at least one token"):
        ad.group_mean(x, torch.tensor([0, 0, 0]), 2, dim=0)


def test_mean_over_layers_selection_and_errors():
    per_layer = torch.arange(12.0).view(3, 4)
    torch.testing.assert_close(ad.mean_over_layers(per_layer), per_layer.mean(0))
    torch.testing.assert_close(ad.mean_over_layers(per_layer, [0, 2]), (per_layer[0] + per_layer[2]) / 2)
    with pytest.raises(ValueError, match="out of range: 3 layers"):
        ad.mean_over_layers(per_layer, [3])
    with pytest.raises(ValueError, match="no layers"):
        ad.mean_over_layers(per_layer, [])


def test_split_heads_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible"):
        ad.image_self_attention(*qkv(1, 4, 1, 10), heads=3)


@pytest.mark.parametrize("dtype,o_tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_fast_precision_matches_exact_within_tolerance(dtype, o_tolerance):
    q, k, v = qkv(2, 40, 4, 16, seed=8, dtype=dtype)
    extra = qkv(2, 7, 4, 16, seed=9, dtype=dtype)[1]
    columns = torch.tensor([5, 6])
    a_e, o_e, x_e = ad.image_self_attention(q, k, v, 4, 40 * 4 * 7, extra_keys=extra, extra_columns=columns)
    a_f, o_f, x_f = ad.image_self_attention(q, k, v, 4, 40 * 4 * 7, extra_keys=extra, extra_columns=columns, precision="fast")
    assert o_f.dtype == torch.float32 and a_f.dtype == torch.float32
    # scores and their sums are float32 in both modes on a CPU (TF32 exists only on CUDA)
    torch.testing.assert_close(a_f, a_e, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x_f, x_e, atol=1e-6, rtol=1e-5)
    # O through the fused kernel in the inputs' dtype: its output rounding (bf16: 8 bits)
    assert (o_f - o_e).abs().max() <= o_tolerance * o_e.abs().max()
    with pytest.raises(ValueError, match="precision must be one of"):
        ad.image_self_attention(q, k, v, 4, precision="half")


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_a_compact_store_gets_the_float32_head_mean_rounded_once(precision):
    """out_a in float16 (the recorder's compact precision): summed over heads in float32, then rounded."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 30, 8 * 8, generator=g) * 2 for _ in range(3))
    want = ad.image_self_attention(q, k, v, 8, 8 * 30 * 4 * 7, precision=precision)[0]
    store = torch.full((2, 2, 30, 30), float("nan"), dtype=torch.float16)
    ad.image_self_attention(q, k, v, 8, 8 * 30 * 4 * 7, out_a=store[:, 1], precision=precision)
    assert torch.isnan(store[:, 0]).all()
    assert torch.equal(store[:, 1], want.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_lse_is_sdpa_and_its_normaliser(dtype):
    """The fused kernel called directly (the recorder's source of the model's own softmax normaliser):
    output bit-identical to F.scaled_dot_product_attention on these inputs, log-sum-exp equal to a
    float64 reference; lse_matches accepts it and refuses a log2-based or shifted one."""
    from anchordiff_core.attention import attention_with_lse, lse_matches

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 70, 4 * 16, generator=g) * 2).to(dtype)
    q, k, v = (x.roll(s, 1).view(2, 70, 4, 16).transpose(1, 2) for s in (0, 5, 11))  # ComfyUI's strided view
    got = attention_with_lse(q, k, v)
    assert got is not None, "CPU SDPA picks the flash kernel for these inputs"
    out, lse = got
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    want = (q.double() @ k.double().transpose(-1, -2) / 4).logsumexp(-1)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 70)
    torch.testing.assert_close(lse.double(), want, atol=2e-5 if dtype == torch.float32 else 2e-4, rtol=1e-6)
    assert lse_matches(q, k, lse)
    assert not lse_matches(q, k, lse / torch.log(torch.tensor(2.0)))
    assert not lse_matches(q, k, lse + 0.01)


def test_attention_with_lse_gives_none_where_the_pick_has_no_normaliser(monkeypatch):
    """Where PyTorch would pick the math fallback (no log-sum-exp), nothing is returned: the recorder recomputes."""
    from anchordiff_core.attention import attention_with_lse

    q = torch.randn(1, 2, 10, 8)
    assert attention_with_lse(q, q, q) is not None
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **kw: 0)  # SDPBackend.MATH
    assert attention_with_lse(q, q, q) is None
