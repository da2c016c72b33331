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


def record(blocks, graph_layers, seg4diff_layer, row_image, num_images, max_chunk_bytes=None):
    spec = RecordSpec(("cat", "red car"), TOKEN_CONCEPT, BLOCKS, graph_layers, seg4diff_layer, max_chunk_bytes)
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
