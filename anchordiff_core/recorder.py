"""What to compute at each joint block of the recorded step, independent of the model's code.

The model-specific side (ComfyUI's MMDiT patch, the diffusers hook) hands each block's image
q/k/v, the image attention output, the prompt keys and the concept q/k/v to
`StepRecorder.record_block`; it returns the concept attention output the concept stream needs
next.  Per-layer results move to `store_device` at once, so the accelerator holds at most one
block's temporaries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .attention import _extra_column_probs, group_mean, image_and_extra_key_columns, image_self_attention, multihead_attention, query_key_attention
from .baselines import concept_attention_scores
from .maps import AttentionMaps


@dataclass(frozen=True)
class RecordSpec:
    """What a recording keeps. Block indices are 0-based joint-block indices."""

    concepts: tuple[str, ...]
    token_concept: torch.Tensor  # [T] concept index of each concept-stream token
    num_blocks: int
    graph_layers: tuple[int, ...]
    seg4diff_layer: Optional[int] = None
    max_chunk_bytes: Optional[int] = None  # None: attention.default_chunk_bytes(device)
    # RECORD_PRECISIONS. "exact": every map float32.  "fast": O_II by SDPA in the model's dtype and
    # stored so, A_II by the fused Triton kernels on CUDA (TF32 products elsewhere), float32.
    # "compact": fast, A_II stored as float16 (summed in float32 first).  "auto": `resolve_precision`
    # picks exact or fast at the recording call.  docs/DESIGN.md "Speed and memory".
    precision: str = "exact"
    # Image-to-concept maps (the Seg4Diff map) at every block, for the consensus anchor
    # (anchors.consensus_map): [B, L, K, N] more, L*K*N floats per image (SD3 Medium at 1024 px:
    # 24 * 4096 * 4 B = 393 KB per concept) and one extra image-query attention pass per block that
    # is not a graph layer.  Off by default: the paper's anchor needs only A_CI.
    ic_blocks: bool = False

    def __post_init__(self):
        bad = [layer for layer in self.graph_layers if not 0 <= layer < self.num_blocks]
        if self.seg4diff_layer is not None and not 0 <= self.seg4diff_layer < self.num_blocks:
            bad.append(self.seg4diff_layer)
        if bad:
            raise ValueError(f"layer index {bad} out of range: this model has {self.num_blocks} joint blocks (0..{self.num_blocks - 1})")
        if not self.graph_layers:
            raise ValueError("at least one graph layer is needed")
        if len(self.concepts) == 0:
            raise ValueError("no concepts to record")
        check_precision(self.precision)


RECORD_PRECISIONS = ("auto", "exact", "fast", "compact")


def check_precision(precision) -> None:
    if precision not in RECORD_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(RECORD_PRECISIONS)}; got {precision!r}. Pick one of them "
                         "(auto, the default, suits every device).")
AUTO_MAP_SHARE = 0.25  # "auto" keeps the maps on the accelerator only within this share of its free memory


def fast_map_bytes(spec: RecordSpec, batch: int, tokens: int, width: int, model_dtype: torch.dtype) -> int:
    """Bytes of A_II and O_II that precision fast keeps on the compute device for `batch` rows."""
    a_dtype, o_dtype = map_dtypes("fast", model_dtype)
    per_layer = tokens * tokens * a_dtype.itemsize + tokens * width * o_dtype.itemsize
    return batch * len(spec.graph_layers) * per_layer


def resolve_precision(precision: str, device, map_bytes: int, free_bytes: int) -> str:
    """The precision a recording call on `device` runs in. "auto": exact on a CPU (where it is the
    fastest: fast's fused attention recomputes the scores the head mean needs anyway); on an
    accelerator fast, which changes no mask on the toy benchmark (docs/DESIGN.md), when its maps
    (`map_bytes`, kept there until the graph is built) fit in AUTO_MAP_SHARE of the free memory, else
    exact (maps in float32 where ComfyUI keeps intermediates, the accelerator holding one layer's
    temporaries).  Other settings are returned as they are."""
    check_precision(precision)
    if precision != "auto":
        return precision
    if torch.device(device).type == "cpu":
        return "exact"
    return "fast" if map_bytes <= AUTO_MAP_SHARE * free_bytes else "exact"


def attention_precision(precision: str) -> str:
    """The attention.PRECISIONS mode a recorder precision computes in (compact computes as fast)."""
    return "exact" if precision == "exact" else "fast"


def map_dtypes(precision: str, model_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(A_II, O_II) storage dtypes. exact: float32 / float32.  fast: float32 / the model's dtype
    (what SDPA computed O_II in: storing it so loses nothing more).  compact: float16 (probabilities
    in [0, 1]: 11 significant bits down to 6e-5, absolute error under 3e-8 below) / the model's dtype."""
    if precision == "exact":
        return torch.float32, torch.float32
    return (torch.float16 if precision == "compact" else torch.float32), model_dtype


class StepRecorder:
    """Collects one denoising step's maps for the rows being recorded, block by block."""

    def __init__(self, spec: RecordSpec, heads: int, store_device=None, interrupt: Optional[Callable[[], None]] = None):
        """`interrupt()` (raising to stop, e.g. ComfyUI's throw_exception_if_processing_interrupted)
        runs between chunks of the image self-attention, so a stop lands within one chunk."""
        if spec.precision == "auto":
            raise ValueError("resolve precision 'auto' for the recording call first (recorder.resolve_precision)")
        self.spec = spec
        self.heads = heads
        self.store_device = store_device
        self.interrupt = interrupt
        self.a_ci: list[Optional[torch.Tensor]] = [None] * spec.num_blocks
        self.ca_scores: list[Optional[torch.Tensor]] = [None] * spec.num_blocks
        self.a_ii: Optional[torch.Tensor] = None  # [B, G, N, N], allocated at the first graph layer
        self.o_ii: Optional[torch.Tensor] = None
        self.graph_done: set[int] = set()
        self.seg4diff: Optional[torch.Tensor] = None
        self.ic: list[Optional[torch.Tensor]] = [None] * spec.num_blocks

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.store_device) if self.store_device is not None else x

    def record_block(
        self,
        block: int,
        q_img: torch.Tensor,
        k_img: torch.Tensor,
        v_img: torch.Tensor,
        img_out: torch.Tensor,
        k_txt: torch.Tensor,
        q_c: torch.Tensor,
        k_c: torch.Tensor,
        v_c: torch.Tensor,
        lse_joint: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Record block `block`; all inputs [B, L, heads*d]. Returns the concept output o_c (float32).

        img_out is the model's own attention output for the image queries (ConceptAttention's o_x).
        `lse_joint` [B, heads, N] (optional): the image queries' log-sum-exp of the scaled scores over
        exactly the keys [k_txt; k_img], i.e. the normaliser of the model's own joint attention (its
        fused kernel returns it: attention.attention_with_lse). Where given, a block that is not a
        graph layer reads its image-to-concept columns from it and the concept keys alone, instead of
        recomputing the image queries' scores over all keys (`wants_lse`).
        """
        spec, heads, k = self.spec, self.heads, len(self.spec.concepts)
        groups = spec.token_concept
        # eq. 5: concept queries, softmax over image keys only; a concept's tokens averaged
        self.a_ci[block] = self._store(group_mean(query_key_attention(q_c, k_img, heads), groups, k, dim=1))
        # ConceptAttention's one-directional attention: concepts see image and concept keys
        o_c = multihead_attention(q_c, torch.cat([k_img, k_c], 1), torch.cat([v_img, v_c], 1), heads)
        self.ca_scores[block] = self._store(concept_attention_scores(img_out, o_c, groups, k))
        seg_here = block == spec.seg4diff_layer or spec.ic_blocks
        if seg_here:
            # image queries over the joint keys with the concept tokens appended to the prompt
            extra_keys = torch.cat([k_txt, k_c], 1)
            columns = torch.arange(k_txt.shape[1], extra_keys.shape[1], device=extra_keys.device)
        if block in spec.graph_layers:
            b, n, width = q_img.shape
            if self.a_ii is None:
                device = self.store_device if self.store_device is not None else q_img.device
                a_dtype, o_dtype = map_dtypes(spec.precision, q_img.dtype)
                self.a_ii = torch.empty(b, len(spec.graph_layers), n, n, dtype=a_dtype, device=device)
                self.o_ii = torch.empty(b, len(spec.graph_layers), n, width, dtype=o_dtype, device=device)
            slot = spec.graph_layers.index(block)
            seg_args = (extra_keys, columns) if seg_here else (None, None)
            if self.a_ii.device == q_img.device:
                _, _, per_token = image_self_attention(
                    q_img, k_img, v_img, heads, spec.max_chunk_bytes, self.a_ii[:, slot], self.o_ii[:, slot], *seg_args,
                    precision=attention_precision(spec.precision), interrupt=self.interrupt,
                )
            else:
                a, o, per_token = image_self_attention(
                    q_img, k_img, v_img, heads, spec.max_chunk_bytes, None, None, *seg_args, precision=attention_precision(spec.precision),
                    interrupt=self.interrupt,
                )
                self.a_ii[:, slot].copy_(a)
                self.o_ii[:, slot].copy_(o)
                del a, o
            self.graph_done.add(block)
        elif seg_here and lse_joint is not None:
            # softmax over [k_img; k_txt; k_c]: the model's normaliser over [k_txt; k_img] joined with the concept keys'
            per_token = _extra_column_probs(q_img, k_c, torch.arange(k_c.shape[1], device=k_c.device), heads,
                                            lse_joint.float(), exact=spec.precision == "exact")
        elif seg_here:
            per_token = image_and_extra_key_columns(
                q_img, k_img, extra_keys, columns, heads, spec.max_chunk_bytes, attention_precision(spec.precision), self.interrupt
            )
        if seg_here:  # per_token [B, N, T] -> per concept [B, K, N]
            per_concept = self._store(group_mean(per_token, groups, k, dim=2).transpose(1, 2).contiguous())
            if block == spec.seg4diff_layer:
                self.seg4diff = per_concept
            if spec.ic_blocks:
                self.ic[block] = per_concept
        return o_c

    def wants_lse(self, block: int) -> bool:
        """Whether `record_block(block, ...)` would use `lse_joint`: an image-to-concept map is recorded
        there (Seg4Diff's layer, or every block for the consensus anchor) and the block is not a graph
        layer (whose A_II pass yields those columns anyway)."""
        return (block == self.spec.seg4diff_layer or self.spec.ic_blocks) and block not in self.spec.graph_layers

    def missing_blocks(self) -> list[int]:
        return [i for i, a in enumerate(self.a_ci) if a is None]

    def finish(
        self,
        row_image: torch.Tensor,
        num_images: int,
        grid: tuple[int, int],
        image_size: tuple[int, int],
        **info,
    ) -> AttentionMaps:
        """Assemble the maps per image. `row_image[r]` is the image index of recorded row r; rows of
        the same image (several positive conditionings in one call) are averaged."""
        missing = self.missing_blocks() + sorted(set(self.spec.graph_layers) - self.graph_done)
        if missing:
            raise RuntimeError(f"joint blocks {missing} were not recorded; the model's forward skipped them")
        in_order = row_image.numel() == num_images and bool((row_image.cpu() == torch.arange(num_images)).all())

        def per_image(x: torch.Tensor) -> torch.Tensor:  # averaged in float32, stored back in x's dtype
            return x if in_order else group_mean(x.float(), row_image.to(x.device), num_images, dim=0).to(x.dtype)

        layers = self.spec.graph_layers
        return AttentionMaps(
            concepts=self.spec.concepts,
            grid=grid,
            image_size=image_size,
            a_ci=per_image(torch.stack(self.a_ci, dim=1)),
            ca_scores=per_image(torch.stack(self.ca_scores, dim=1)),
            a_ii=per_image(self.a_ii),
            o_ii=per_image(self.o_ii),
            graph_layers=tuple(layers),
            seg4diff=None if self.seg4diff is None else per_image(self.seg4diff),
            seg4diff_layer=self.spec.seg4diff_layer,
            ic=per_image(torch.stack(self.ic, dim=1)) if self.spec.ic_blocks else None,
            num_blocks=self.spec.num_blocks,
            **info,
        )
