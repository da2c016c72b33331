"""StepRecorder (what the ComfyUI patch and the diffusers hook both call) against the independent
numpy transcription of eqs. 3-6 and the baselines in tests/reference_recorder.py."""
import numpy as np
import pytest
import torch

import reference_recorder as ref
from anchordiff_core.recorder import RecordSpec, StepRecorder, fast_map_bytes, resolve_precision

HEADS, D, N, TEXT, BLOCKS = 2, 4, 12, 5, 3
TOKEN_CONCEPT = torch.tensor([0, 1, 1])  # two concepts, the second of two tokens
K = 2


def block_inputs(rows, seed):
    """q_img, k_img, v_img, img_out, k_txt, q_c, k_c, v_c for `rows` recorded rows."""
    g = torch.Generator().manual_seed(seed)
    width = HEADS * D
    lengths = (N, N, N, N, TEXT, 3, 3, 3)
    return [torch.randn(rows, length, width, generator=g) * 1.5 for length in lengths]


def record(blocks, graph_layers, seg4diff_layer, row_image, num_images, max_chunk_bytes=None, ic_blocks=False):
    spec = RecordSpec(("cat", "red car"), TOKEN_CONCEPT, BLOCKS, graph_layers, seg4diff_layer, max_chunk_bytes, ic_blocks=ic_blocks)
    step = StepRecorder(spec, HEADS)
    concept_outputs = [step.record_block(index, *inputs) for index, inputs in enumerate(blocks)]
    maps = step.finish(torch.tensor(row_image), num_images, grid=(3, 4), image_size=(48, 64), sigma=0.75, step=2)
    return maps, concept_outputs


@pytest.mark.parametrize("graph_layers, seg4diff_layer", [((0, 2), 1), ((0, 2), 2), ((1,), 1)])
@pytest.mark.parametrize("max_chunk_bytes", [None, HEADS * N * 4 * 5])  # whole, or 5 query rows per chunk
def test_step_recorder_equals_the_transcription_of_the_paper(graph_layers, seg4diff_layer, max_chunk_bytes):
    blocks = [block_inputs(2, seed) for seed in range(BLOCKS)]
    maps, concept_outputs = record(blocks, graph_layers, seg4diff_layer, [0, 1], 2, max_chunk_bytes)
    want = ref.recorded_step([[x.numpy() for x in b] for b in blocks], HEADS, TOKEN_CONCEPT.numpy(), K,
                             graph_layers, seg4diff_layer, [0, 1], 2)
    for name in ("a_ci", "ca_scores", "a_ii", "o_ii", "seg4diff"):
        got = getattr(maps, name)
        assert got.dtype == torch.float32 and got.shape == want[name].shape, name
        np.testing.assert_allclose(got.numpy(), want[name], atol=2e-5, rtol=1e-4, err_msg=name)
    for index, o_c in enumerate(concept_outputs):  # what the concept stream carries to the next block
        for row in range(2):
            np.testing.assert_allclose(o_c[row].numpy(), want["o_c"][row][index], atol=2e-5, rtol=1e-4)
    assert maps.graph_layers == graph_layers and maps.seg4diff_layer == seg4diff_layer
    # not trivially equal: concepts, layers and images differ
    assert (maps.a_ci[:, :, 0] - maps.a_ci[:, :, 1]).abs().max() > 1e-2
    assert (maps.a_ii[0] - maps.a_ii[1]).abs().max() > 1e-2


@pytest.mark.parametrize("graph_layers, seg4diff_layer, row_image", [((0, 2), 1, [0, 1]), ((1,), None, [0, 1, 0, 1])])
def test_image_to_concept_maps_at_every_block_for_the_consensus_anchor(graph_layers, seg4diff_layer, row_image):
    """RecordSpec.ic_blocks: the Seg4Diff map at every block (graph layers or not, with or without a
    Seg4Diff layer), rows of one image averaged; the other maps do not change; off -> maps.ic is None."""
    blocks = [block_inputs(len(row_image), 20 + seed) for seed in range(BLOCKS)]
    maps, _ = record(blocks, graph_layers, seg4diff_layer, row_image, 2, HEADS * N * 4 * 5, ic_blocks=True)
    want = ref.recorded_step([[x.numpy() for x in b] for b in blocks], HEADS, TOKEN_CONCEPT.numpy(), K,
                             graph_layers, seg4diff_layer or 0, row_image, 2)
    assert maps.ic.shape == (2, BLOCKS, K, N)
    np.testing.assert_allclose(maps.ic.numpy(), want["ic"], atol=2e-5, rtol=1e-4)
    assert (maps.ic[:, 0] - maps.ic[:, 2]).abs().max() > 1e-3  # blocks differ: not one block copied
    plain, _ = record(blocks, graph_layers, seg4diff_layer, row_image, 2, HEADS * N * 4 * 5)
    assert plain.ic is None
    for name in ("a_ci", "ca_scores", "a_ii", "o_ii", "seg4diff"):
        a, b = getattr(maps, name), getattr(plain, name)
        # equal up to float rounding: at a graph layer A_II is computed in the same pass as the extra columns
        assert (a is None and b is None) or torch.allclose(a, b, rtol=0, atol=1e-6), name
    assert torch.equal(maps.select([1]).ic, maps.ic[1:])


def test_several_positive_conditionings_of_one_image_are_averaged():
    """ConditioningCombine: one model call carries two positive rows per image; the design promises
    their mean. Rows: image 0 prompt A, image 1 prompt A, image 0 prompt B, image 1 prompt B."""
    blocks = [block_inputs(4, 10 + seed) for seed in range(BLOCKS)]
    row_image = [0, 1, 0, 1]
    maps, _ = record(blocks, (0, 2), 1, row_image, 2)
    want = ref.recorded_step([[x.numpy() for x in b] for b in blocks], HEADS, TOKEN_CONCEPT.numpy(), K, (0, 2), 1, row_image, 2)
    for name in ("a_ci", "ca_scores", "a_ii", "o_ii", "seg4diff"):
        np.testing.assert_allclose(getattr(maps, name).numpy(), want[name], atol=2e-5, rtol=1e-4, err_msg=name)
    # and that mean is not the first prompt's maps alone
    first, _ = record([[x[:2] for x in b] for b in blocks], (0, 2), 1, [0, 1], 2)
    assert (first.a_ci - maps.a_ci).abs().max() > 1e-3


def test_auto_precision_rule_and_the_fast_maps_it_weighs():
    """auto: exact on a CPU whatever the memory; on an accelerator fast while its maps fit in a quarter
    of the free memory, else exact. Other settings pass through; 'auto' is resolved before recording."""
    assert resolve_precision("auto", "cpu", 1, 10**12) == "exact"
    assert resolve_precision("auto", "cuda", 100, 400) == "fast"
    assert resolve_precision("auto", "cuda", 101, 400) == "exact"
    assert [resolve_precision(p, "cuda", 10**12, 1) for p in ("exact", "fast", "compact")] == ["exact", "fast", "compact"]
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("half", "cuda", 1, 1)
    # SD3 Medium at 1024 x 1024 in bf16, graph layers 9 and 18: A_II float32 + O_II bf16 = 152 MiB per image
    spec = RecordSpec(("cat",), torch.zeros(1, dtype=torch.long), 24, (9, 18), 9)
    assert fast_map_bytes(spec, 1, 4096, 1536, torch.bfloat16) == 152 * 2**20
    assert fast_map_bytes(spec, 3, 4096, 1536, torch.bfloat16) == 3 * 152 * 2**20
    with pytest.raises(ValueError, match="resolve precision 'auto'"):
        StepRecorder(RecordSpec(("cat",), torch.zeros(1, dtype=torch.long), 24, (9, 18), 9, precision="auto"), 24)


# ------------------------------------------------------------------------------ stopping inside a block
class Stop(Exception):
    pass


def counting(stop_at=None):
    """An interrupt() that counts its calls and raises Stop at call `stop_at`."""
    calls = []

    def interrupt():
        calls.append(1)
        if stop_at is not None and len(calls) >= stop_at:
            raise Stop

    return interrupt, calls


@pytest.mark.parametrize("graph_layers, seg4diff_layer", [((0, 2), 1), ((0, 2), 2)])
def test_interrupt_runs_after_every_chunk_and_changes_no_map(graph_layers, seg4diff_layer):
    """interrupt() runs after every head's chunk of query rows of every recorded row, on graph layers
    and on a Seg4Diff-only layer: a stop waits for one chunk, not a block. The maps are those
    recorded without it."""
    chunk = HEADS * N * 4 * 5 // HEADS  # one head's scores of 5 rows
    blocks = [block_inputs(2, seed) for seed in range(BLOCKS)]
    plain, _ = record(blocks, graph_layers, seg4diff_layer, [0, 1], 2, chunk)
    spec = RecordSpec(("cat", "red car"), TOKEN_CONCEPT, BLOCKS, graph_layers, seg4diff_layer, chunk)
    interrupt, calls = counting()
    step = StepRecorder(spec, HEADS, interrupt=interrupt)
    per_block = []
    for index, inputs in enumerate(blocks):
        before = len(calls)
        step.record_block(index, *inputs)
        per_block.append(len(calls) - before)
    # graph layers: 5 rows of 12 image keys per chunk -> 3 chunks; a Seg4Diff-only layer: 240 bytes
    # of 12 + 5 + 3 keys -> 3 rows per chunk -> 4 chunks
    chunks = [3 if i in graph_layers else 4 if i == seg4diff_layer else 0 for i in range(BLOCKS)]
    assert per_block == [2 * HEADS * c for c in chunks]
    checked = step.finish(torch.tensor([0, 1]), 2, grid=(3, 4), image_size=(48, 64), sigma=0.75, step=2)
    for name in ("a_ci", "ca_scores", "a_ii", "o_ii", "seg4diff"):
        assert torch.equal(getattr(checked, name), getattr(plain, name)), name


@pytest.mark.parametrize("block, graph_layers, seg4diff_layer", [(0, (0,), 1), (1, (0,), 1)])  # a graph layer; Seg4Diff alone
def test_interrupt_stops_a_block_midway(block, graph_layers, seg4diff_layer):
    spec = RecordSpec(("cat", "red car"), TOKEN_CONCEPT, BLOCKS, graph_layers, seg4diff_layer, HEADS * N * 4 * 5 // HEADS)
    interrupt, calls = counting(stop_at=2)
    step = StepRecorder(spec, HEADS, interrupt=interrupt)
    with pytest.raises(Stop):
        step.record_block(block, *block_inputs(2, 0))
    assert len(calls) == 2  # the second of 12 chunks: the rest never ran


def joint_lse(q_img, k_txt, k_img):
    """The image queries' log-sum-exp of the scaled scores over [k_txt; k_img], per head: [B, H, N] (float64)."""
    qh = q_img.double().view(q_img.shape[0], N, HEADS, D).transpose(1, 2)
    keys = torch.cat([k_txt, k_img], 1).double()
    kh = keys.view(keys.shape[0], keys.shape[1], HEADS, D).transpose(1, 2)
    return (qh @ kh.transpose(-1, -2) * D**-0.5).logsumexp(-1)


@pytest.mark.parametrize("graph_layers, seg4diff_layer", [((0, 2), 1), ((1,), None)])
def test_image_to_concept_maps_from_the_models_own_normaliser(graph_layers, seg4diff_layer):
    """lse_joint (the model's attention normaliser over the prompt and image keys, which the ComfyUI
    patch reads from the fused kernel) gives the same ic / Seg4Diff maps as recomputing the scores,
    against the transcription; a normaliser over the image keys only (the prompt left out) does not."""
    row_image = [0, 1]
    blocks = [block_inputs(2, 40 + seed) for seed in range(BLOCKS)]
    want = ref.recorded_step([[x.numpy() for x in b] for b in blocks], HEADS, TOKEN_CONCEPT.numpy(), K,
                             graph_layers, seg4diff_layer or 0, row_image, 2)

    def recorded(lse_of):
        spec = RecordSpec(("cat", "red car"), TOKEN_CONCEPT, BLOCKS, graph_layers, seg4diff_layer, ic_blocks=True)
        step = StepRecorder(spec, HEADS)
        used = []
        for index, (q, k, v, out, k_txt, q_c, k_c, v_c) in enumerate(blocks):
            lse = lse_of(q, k, k_txt) if step.wants_lse(index) else None
            used.append(lse is not None)
            step.record_block(index, q, k, v, out, k_txt, q_c, k_c, v_c, lse)
        assert used == [b not in graph_layers for b in range(BLOCKS)]
        return step.finish(torch.tensor(row_image), 2, grid=(3, 4), image_size=(48, 64), sigma=0.75, step=2)

    maps = recorded(lambda q, k, k_txt: joint_lse(q, k_txt, k).float())
    np.testing.assert_allclose(maps.ic.numpy(), want["ic"], atol=2e-5, rtol=1e-4)
    if seg4diff_layer is not None:
        np.testing.assert_allclose(maps.seg4diff.numpy(), want["seg4diff"], atol=2e-5, rtol=1e-4)
    wrong = recorded(lambda q, k, k_txt: joint_lse(q, k_txt[:, :0], k).float())  # planted: the prompt keys left out
    non_graph = [b for b in range(BLOCKS) if b not in graph_layers]
    assert np.abs(wrong.ic.numpy()[:, non_graph] - want["ic"][:, non_graph]).max() > 1e-3
