"""The recorder: the MODEL patch that records attention maps during one denoising step, for every
backbone behind nodes/models (SD3 / SD3.5, the Flux family, Qwen-Image). What is specific to a
backbone (its blocks, token layout, concept stream, defaults) lives in its adapter; this module is
generic.

How a recording works
- `AttentionRecorder.attach(model)` returns a clone of the MODEL with two wrappers:
  OUTER_SAMPLE (one per sampling run: picks the recording step from the run's sigmas, and at the
  end files the maps under a fingerprint of each output latent) and APPLY_MODEL (per model call:
  a sigma comparison; only the recording call goes further).
- On the recording call only, per-block replace patches (the adapter's `block_keys`) are added to
  that call's transformer_options.  Each runs the original block with an
  `optimized_attention_override` that sees the joint attention's q, k, v and its output, then the
  adapter advances the concept stream through the block's prompt-stream weights and records the
  maps for the positive rows.  The image and prompt streams are untouched: the original block
  computes them.
- Consumers get maps by the LATENT the sampler returned, so ComfyUI's output cache can never
  serve maps of another run.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import math
import dataclasses
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.model_management
import comfy.patcher_extension

from .errors import AnchorDiffError
from .models.base import BackboneAdapter

from ..anchordiff_core.attention import attention_with_lse, lse_matches
from ..anchordiff_core.concepts import ConceptSet
from ..anchordiff_core.maps import AttentionMaps
from ..anchordiff_core.recorder import RecordSpec, StepRecorder, fast_map_bytes, resolve_precision

log = logging.getLogger("anchordiff")

WRAPPER_KEY = "anchordiff_recorder"
CALL_KEY = "anchordiff_call"


# ------------------------------------------------------------------------------ recording
def choose_recording_step(sigmas, record_at: float, record_step: int, percent_to_sigma) -> tuple[Optional[int], float, str]:
    """(step, its sigma, "") for a sampling run over `sigmas` (the run's N+1 sigmas; the model is
    evaluated at the first N), or (None, nan, why not) -- worded for the user, the right way round.

    record_step >= 0 picks that step.  Otherwise the target noise level is
    percent_to_sigma(record_at) (record_at up = later = less noise) and the sampled step whose sigma
    is nearest to it is recorded (ties: the earlier step), provided the target lies within the run:
    no further above its first sampled sigma than half the first step, and no nearer to the run's
    final sigma (never evaluated) than to its last sampled one.
    """
    sigmas = [float(s) for s in sigmas]
    steps = len(sigmas) - 1
    broken = [i for i, s in enumerate(sigmas) if not math.isfinite(s)]
    if broken:
        return None, math.nan, (
            f"the sampler's noise schedule holds a non-finite sigma ({sigmas[broken[0]]} at step {broken[0]} of {steps}; "
            "kl_optimal at 1 step does this), so the model ran on NaN and the image is broken too. "
            "Use more steps or another scheduler"
        )
    if record_step >= 0:
        if record_step >= steps:
            return None, math.nan, (
                f"the recording step {record_step} never ran: the sampler ran {steps} step(s) "
                f"(0..{max(steps - 1, 0)}). Lower 'record_step' or set it to -1 to use 'record_at'"
            )
        return record_step, sigmas[record_step], ""
    target = float(percent_to_sigma(record_at))
    where = f"the recording point (record_at={record_at:g}, sigma {target:.3f}) is outside this sampling run"
    if steps <= 0:
        return None, math.nan, f"{where}: the sampler ran no step. Use at least one step"
    first, last = sigmas[0], sigmas[steps - 1]
    if target > first + (first - sigmas[1]) / 2:
        at_least = _record_at_for(first, percent_to_sigma, upward=True)
        if float(percent_to_sigma(at_least)) > first + (first - sigmas[1]) / 2:  # not even record_at 0.99 reaches it
            return None, math.nan, (
                f"{where}: it starts at sigma {first:.3f}, below the noise level of every record_at "
                f"({at_least:.2f} is sigma {float(percent_to_sigma(at_least)):.3f}). "
                f"Use record_step ({_step_range(steps)}), or more steps or another scheduler"
            )
        return None, math.nan, (
            f"{where}: it starts at sigma {first:.3f}, with less noise (img2img: denoise below 1). "
            f"Raise denoise, or raise record_at to {at_least:.2f} or more, or use record_step"
        )
    if target < (last + sigmas[steps]) / 2:
        at_most = _record_at_for(last, percent_to_sigma, upward=False)
        if float(percent_to_sigma(at_most)) < (last + sigmas[steps]) / 2:  # not even record_at 0.01 reaches it
            return None, math.nan, (
                f"{where}: its {steps} sampled step(s) end at sigma {last:.3f}, above the noise level of every record_at "
                f"({at_most:.2f} is sigma {float(percent_to_sigma(at_most)):.3f}). "
                f"Use record_step ({_step_range(steps)}), or more steps (or a later end_at_step)"
            )
        return None, math.nan, (
            f"{where}: its {steps} sampled step(s) end at sigma {last:.3f}, with more noise. "
            f"Use more steps (or a later end_at_step), or lower record_at to {at_most:.2f} or less, or use record_step"
        )
    step = min(range(steps), key=lambda i: (abs(sigmas[i] - target), i))
    return step, sigmas[step], ""


def step_text(step: int, steps: Optional[int] = None) -> str:
    """A sampled step as users read it everywhere (Read Maps, the log, messages): counted from 1 as
    the sampler's progress bar counts ("step 3/4" is the bar's 3/4), with the record_step value
    that picks it (record_step counts from 0)."""
    of = f"/{steps}" if steps else ""
    return f"step {step + 1}{of} of the sampler (record_step {step})"


def _step_range(steps: int) -> str:
    """The record_step values of a run of `steps` sampled steps, as Read Maps counts them."""
    return "0, the only step" if steps == 1 else f"0..{steps - 1}"


def _record_at_for(sigma: float, percent_to_sigma, upward: bool) -> float:
    """The record_at (rounded to the node's 0.01 steps, towards the safe side) whose target sigma is
    `sigma`: percent_to_sigma falls as record_at rises, so a record_at at or above it targets at most
    `sigma` (upward=True), one at or below it targets at least `sigma` (upward=False)."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if float(percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    value = math.ceil(hi * 100 - 1e-6) / 100 if upward else math.floor(lo * 100 + 1e-6) / 100
    return min(max(value, 0.01), 0.99)


@dataclass(frozen=True)
class RecordSettings:
    record_at: float = 0.5  # fraction of the trajectory (noise level, as ComfyUI's start/end percent)
    record_step: int = -1  # >= 0: this sampled step index instead
    keep_runs: int = 2


@dataclass
class _Run:
    run_id: int
    sigmas: list[float]
    latent_hw: tuple[int, int]
    batch: int
    target_step: Optional[int] = None
    target_sigma: float = math.nan
    reason: str = ""  # why nothing was (or will be) recorded
    maps: Optional[AttentionMaps] = None
    recording: bool = False  # a model call is recording now (claimed under the recorder's lock)


@dataclass
class _Outcome:
    run_id: int
    maps: Optional[AttentionMaps]
    reason: str
    images: dict = field(default_factory=dict)  # fingerprint -> image index
    denoised: set = field(default_factory=set)  # fingerprints of the last step's denoised prediction


def _keep_last_x0(args: tuple, kwargs: dict, keep: dict) -> tuple[tuple, dict]:
    """outer_sample's (denoise_mask, callback, ...) with the callback also keeping its latest x0."""
    args, kwargs = list(args), dict(kwargs)
    callback = args[1] if len(args) > 1 else kwargs.get("callback")
    if callback is None:
        return tuple(args), kwargs

    def keeping(step, x0, x, total_steps):
        keep["x0"] = x0
        return callback(step, x0, x, total_steps)

    if len(args) > 1:
        args[1] = keeping
    else:
        kwargs["callback"] = keeping
    return tuple(args), kwargs


def latent_fingerprint(image_latent: torch.Tensor) -> str:
    """The key a run's maps are filed under. Computed on the latent rounded to fp16, so it survives
    the cast ComfyUI applies to the sampler's output (`--fp16-intermediates` hands on an fp16 LATENT;
    casting fp32 -> fp16 rounds exactly the same way whoever does it)."""
    data = image_latent.detach().to("cpu", torch.float16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class AttentionRecorder:
    """Records AnchorDiff's maps during sampling with a patched MODEL; one per "Record" node output.

    Shared by every clone of the patched MODEL (ComfyUI deep-copies model options on clone).
    """

    _ids = itertools.count(1)

    def __init__(self, concepts: ConceptSet, spec: RecordSpec, settings: RecordSettings, adapter: BackboneAdapter):
        self.concepts = concepts
        self.spec = spec
        self.settings = settings
        self.adapter_class = type(adapter)
        self.variant = adapter.variant()
        self.recorder_id = next(self._ids)
        self._runs = itertools.count(1)
        self._active: Optional[_Run] = None
        self._outcomes: "OrderedDict[int, _Outcome]" = OrderedDict()
        self._by_fingerprint: dict[str, int] = {}
        # ComfyUI >= 0.33 runs the model calls of one step in threads for multi-GPU work units:
        # one of them claims the recording, under this lock.
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        return self

    def attach(self, model):
        """A patched clone of `model` (the input MODEL stays untouched)."""
        patched = model.clone()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, self._outer_sample)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, self._apply_model)
        return patched

    # ---------------------------------------------------------------- one sampling run
    def _outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        run = _Run(next(self._runs), [float(s) for s in sigmas.detach().cpu()], tuple(noise.shape[-2:]), int(noise.shape[0]))
        self._choose_step(run, guider.model_patcher.get_model_object("model_sampling"))
        last_x0 = {}
        args, kwargs = _keep_last_x0(args, kwargs, last_x0)
        self._active = run
        try:
            output = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            self._active = None  # an interrupted run leaves nothing behind
        self._file(run, output)
        if isinstance(last_x0.get("x0"), torch.Tensor) and last_x0["x0"].shape == output.shape:
            # what SamplerCustomAdvanced returns as 'denoised_output': recognised, to say what to connect instead
            denoised = guider.model_patcher.model.process_latent_out(last_x0["x0"].cpu())
            self._outcomes[run.run_id].denoised = {latent_fingerprint(image) for image in denoised}
        return output

    def _choose_step(self, run: _Run, model_sampling) -> None:
        run.target_step, run.target_sigma, run.reason = choose_recording_step(
            run.sigmas, self.settings.record_at, self.settings.record_step, model_sampling.percent_to_sigma
        )
        if run.target_step is not None:
            where = step_text(run.target_step, len(run.sigmas) - 1)
            log.info("AnchorDiff: recording %s at sigma %.4f (%s)", where, run.target_sigma, self._asked())
            run.reason = f"the sampler never evaluated the model at the recording {where} (sigma {run.target_sigma:.4f})"

    def _asked(self) -> str:
        if self.settings.record_step >= 0:
            return f"record_step={self.settings.record_step}"
        return f"record_at={self.settings.record_at:g}"

    def _file(self, run: _Run, output: torch.Tensor) -> None:
        outcome = _Outcome(run.run_id, run.maps, "" if run.maps is not None else run.reason)
        for index in range(output.shape[0]):
            fingerprint = latent_fingerprint(output[index])
            outcome.images[fingerprint] = index
            self._by_fingerprint[fingerprint] = run.run_id
        self._outcomes[run.run_id] = outcome
        while len(self._outcomes) > max(1, self.settings.keep_runs):
            _, dropped = self._outcomes.popitem(last=False)
            for fingerprint in dropped.images:
                if self._by_fingerprint.get(fingerprint) == dropped.run_id:
                    del self._by_fingerprint[fingerprint]

    # ---------------------------------------------------------------- one model call
    def _apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        run = self._active
        rows, row_image = self._rows_to_record(run, x, t, transformer_options)
        if rows is None or not self._claim(run):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        try:
            return self._record_call(run, rows, row_image, executor, x, t, c_concat, c_crossattn, control,
                                     transformer_options, **kwargs)
        finally:
            with self._lock:
                run.recording = False

    def _claim(self, run: _Run) -> bool:
        """Whether this model call records: the first one at the recording point that finds no maps
        and no other call recording (calls may run concurrently, one thread per device)."""
        with self._lock:
            if run.maps is not None or run.recording:
                return False
            run.recording = True
            return True

    def _record_call(self, run: _Run, rows, row_image, executor, x, t, c_concat, c_crossattn, control,
                     transformer_options, **kwargs):
        adapter = self.adapter_class(executor.class_obj.diffusion_model)
        spec = self._resolved_spec(executor.class_obj, adapter, x, rows.numel())
        # fast: the maps stay on the compute device until the graph is built (no host round trip)
        store = None if spec.precision != "exact" else comfy.model_management.intermediate_device()
        call = _Call(self, adapter, rows.to(x.device), store, spec)
        call.grid = adapter.grid(run.latent_hw)
        call.grid_tokens = math.prod(call.grid)
        options = dict(transformer_options)
        patches = dict(options.get("patches_replace", {}))
        dit = dict(patches.get("dit", {}))
        for index, key in enumerate(adapter.block_keys()):
            call.previous[index] = dit.get(key)
            dit[key] = call.block_patch(index)
        patches["dit"] = dit
        options["patches_replace"] = patches
        options[CALL_KEY] = call
        output = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        if call.problem:
            log.warning("AnchorDiff: not recording this model call: %s", call.problem)
            run.reason = call.problem
            return output
        h_lat, w_lat = run.latent_hw
        run.maps = call.step.finish(
            row_image,
            run.batch,
            grid=adapter.grid(run.latent_hw),
            image_size=(h_lat * adapter.pixels_per_latent, w_lat * adapter.pixels_per_latent),
            sigma=run.target_sigma,
            step=run.target_step,
            meta={"id": uuid.uuid4().hex, "recorder": self.recorder_id, "run": run.run_id, "model": self.variant,
                  "sampled_steps": len(run.sigmas) - 1, "asked": self._asked(), "precision": spec.precision},
        )
        return output

    def _resolved_spec(self, base_model, adapter: BackboneAdapter, x: torch.Tensor, rows: int) -> RecordSpec:
        """The spec with precision "auto" resolved for this call's device, batch and free memory."""
        if self.spec.precision != "auto":
            return self.spec
        tokens = math.prod(adapter.grid(tuple(x.shape[-2:])))
        width = adapter.width()
        dtype = getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()  # what the blocks compute in
        need = fast_map_bytes(self.spec, rows, tokens, width, dtype)
        free = comfy.model_management.get_free_memory(x.device) if x.device.type != "cpu" else 0
        chosen = resolve_precision("auto", x.device, need, free)
        log.info("AnchorDiff: recording in precision %s (auto: %.0f MiB of maps, %.0f MiB free on %s)", chosen, need / 2**20, free / 2**20, x.device)
        return dataclasses.replace(self.spec, precision=chosen)

    @staticmethod
    def _rows_to_record(run: Optional[_Run], x, t, transformer_options) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(rows, image of each row) if this model call is the run's recording call, else (None, None):
        the recording step's sigma, the full latent (not an area crop), and positive chunks in it."""
        if run is None or run.maps is not None or run.target_step is None:
            return None, None
        sigma = float(t.reshape(-1)[0])
        if abs(sigma - run.target_sigma) > 1e-5 * max(1.0, run.target_sigma) or tuple(x.shape[-2:]) != run.latent_hw:
            return None, None
        cond_or_uncond = transformer_options.get("cond_or_uncond")
        if not cond_or_uncond:
            return None, None
        rows_in_call = x.shape[0]
        chunk = rows_in_call // len(cond_or_uncond)
        positive = [i for i, kind in enumerate(cond_or_uncond) if kind == 0]
        if not positive or chunk == 0:
            return None, None
        rows = torch.tensor([c * chunk + j for c in positive for j in range(chunk)], dtype=torch.long)
        return rows, torch.arange(chunk).repeat(len(positive))

    # ---------------------------------------------------------------- consumers
    def maps_for(self, samples: torch.Tensor) -> AttentionMaps:
        """The maps recorded while the sampler produced `samples` (a LATENT's "samples")."""
        if samples.dim() != 4 and not (samples.dim() == 5 and samples.shape[2] == 1):  # 5-D: one frame (Qwen-Image)
            raise AnchorDiffError(f"expected an image LATENT batch [B, C, H, W] or [B, C, 1, H, W]; got shape {tuple(samples.shape)}")
        found = []
        for index in range(samples.shape[0]):
            fingerprint = latent_fingerprint(samples[index])
            run_id = self._by_fingerprint.get(fingerprint)
            if run_id is None:
                if any(fingerprint in outcome.denoised for outcome in self._outcomes.values()):
                    raise AnchorDiffError(
                        "This LATENT is the sampler's denoised prediction (SamplerCustomAdvanced's 'denoised_output'), "
                        "not the image it sampled. Connect the sampler's 'output' LATENT to Read Maps instead."
                    )
                if not self._outcomes:
                    raise AnchorDiffError(
                        "No sampling run has used this recorder's MODEL yet. Connect the MODEL output of "
                        "'AnchorDiff Record Attention' to the sampler, and this node's 'latent' to that sampler's LATENT output."
                    )
                raise AnchorDiffError(
                    "This LATENT was not produced by a sampler using this recorder's MODEL (or its maps were dropped: "
                    f"only the last {self.settings.keep_runs} run(s) are kept). Connect the LATENT output of the sampler "
                    "that used the recording MODEL, unmodified."
                )
            found.append((run_id, self._outcomes[run_id]))
        runs = {run_id for run_id, _ in found}
        if len(runs) > 1:
            raise AnchorDiffError("The LATENT batch mixes images from different sampling runs; read their maps separately.")
        outcome = found[0][1]
        if outcome.maps is None:
            raise AnchorDiffError(f"No maps were recorded in that sampling run: {outcome.reason}.")
        indices = [outcome.images[latent_fingerprint(samples[i])] for i in range(samples.shape[0])]
        if indices == list(range(outcome.maps.batch_size)):
            return outcome.maps
        return outcome.maps.select(indices)

    def last_run_maps(self) -> AttentionMaps:
        """Maps of the most recent finished run (used by the one-pass image node)."""
        if not self._outcomes:
            raise AnchorDiffError("the model was never run")
        outcome = next(reversed(self._outcomes.values()))
        if outcome.maps is None:
            raise AnchorDiffError(f"No maps were recorded: {outcome.reason}.")
        return outcome.maps


class _Call:
    """State of the one recording model call: the concept stream and the per-block recorder."""

    def __init__(self, recorder: AttentionRecorder, adapter: BackboneAdapter, rows: torch.Tensor, store_device, spec: RecordSpec):
        self.recorder = recorder
        self.adapter = adapter
        self.concepts = recorder.concepts
        self.rows = rows
        self.step = StepRecorder(spec, adapter.heads(), store_device, comfy.model_management.throw_exception_if_processing_interrupted)
        self.previous: dict[int, Optional[callable]] = {}
        self.concept_state: Optional[torch.Tensor] = None
        self.concept_pe = None  # the concept tokens' RoPE table, for backbones whose text has positions
        self.grid: tuple[int, int] = (0, 0)  # the latent's image token grid (rows, columns)
        self.grid_tokens = 0  # image tokens of the latent's grid (reference tokens follow them)
        self.text_len: Optional[int] = None  # prompt tokens, where a block's arguments do not say
        self.problem = ""
        self.joint_lse = _JointAttentionLSE()

    def __deepcopy__(self, memo):
        return self

    def block_patch(self, index: int):
        def patch(args, extra):
            options = args["transformer_options"]
            previous_override = options.get("optimized_attention_override")
            captured = []

            def capture(func, *a, **kw):
                lse = None
                if not captured and previous_override is None and self.step.wants_lse(index):
                    out, lse = self.joint_lse(func, a, kw)
                else:
                    out = previous_override(func, *a, **kw) if previous_override is not None else func(*a, **kw)
                if not captured:  # the block's first attention call is the joint one (MMDiT-X's attn2 follows)
                    captured.append((a[0], a[1], a[2], out, lse))
                return out

            inner = dict(args)
            inner["transformer_options"] = {**options, "optimized_attention_override": capture}
            original = self.adapter.original_block(index, extra)
            previous = self.previous.get(index)
            result = previous(inner, {**extra, "original_block": original}) if previous is not None else original(inner)
            if not self.problem:
                self._record(index, args, captured)
            return result

        return patch

    def _record(self, index: int, args: dict, captured: list) -> None:
        if not captured:
            self.problem = f"joint block {index} ran no attention (another patch replaced or skipped it)"
            return
        self.problem = self.adapter.record_block(self, index, args, captured[0])


class _JointAttentionLSE:
    """A block's joint attention call, also giving the row log-sum-exp of its scores (the model's own
    softmax normaliser), so the recorder reads the image-to-concept maps of the blocks that are not
    graph layers from it instead of recomputing q k^T (docs/DESIGN.md "Speed and memory").

    The call runs through `attention_with_lse` (the fused kernel F.scaled_dot_product_attention picks,
    called directly) only once that was found, for the same function and input layout in this
    recording call, to give output bit-identical to the model's own attention function, with a log-
    sum-exp equal to a float32 reference on sampled rows: the first time both run and the model gets
    its own function's result. Any other case (an attention function that is not plain SDPA, such as
    sage, xformers or sub-quadratic attention; a mask; extra arguments; a kernel picked differently)
    runs the model's function unchanged and returns no log-sum-exp: the recorder then recomputes."""

    def __init__(self):
        self.usable: dict = {}  # layout -> bool, decided by the first comparison

    def __call__(self, func, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        layout = self._layout(func, args, kwargs)
        if layout is None or self.usable.get(layout[0]) is False:
            return func(*args, **kwargs), None
        key, (q, k, v), heads, flat_output = layout
        got = attention_with_lse(q, k, v)
        if got is None:
            self.usable[key] = False
            return func(*args, **kwargs), None
        out, lse = got
        if flat_output:
            out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], heads * out.shape[3])
        if key not in self.usable:
            own = func(*args, **kwargs)
            same = (isinstance(own, torch.Tensor) and own.shape == out.shape and own.dtype == out.dtype
                    and torch.equal(own, out) and lse_matches(q, k, lse))
            self.usable[key] = same
            if not same:
                log.info("AnchorDiff: the model's attention function (%s) is not the fused SDPA kernel here; "
                         "recording recomputes the image-to-concept scores", getattr(func, "__name__", func))
            return own, (lse if same else None)
        return out, lse

    @staticmethod
    def _layout(func, args: tuple, kwargs: dict):
        """(key, (q, k, v) [B, H, L, d], heads, whether the output is [B, L, H*d]) of a ComfyUI attention
        call optimized_attention(q, k, v, heads, mask=None, ..., skip_reshape, skip_output_reshape), or
        None for a call this does not take over."""
        if len(args) < 3 or len(args) > 5 or (len(args) == 5 and args[4] is not None) or kwargs.get("mask") is not None:
            return None
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        tensors = args[:3]
        if not isinstance(heads, int) or not all(isinstance(t, torch.Tensor) for t in tensors):
            return None
        if kwargs.get("skip_reshape", False):
            if any(t.dim() != 4 or t.shape[1] != heads for t in tensors):
                return None
            qkv = tensors
        else:
            b = tensors[0].shape[0]
            try:  # as ComfyUI's attention functions view [B, L, H*d] (or [B, L, H, d]) inputs
                qkv = tuple(t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in tensors)
            except RuntimeError:
                return None
        options = tuple(sorted((name, value if isinstance(value, (bool, int, float, str, type(None))) else type(value).__name__)
                               for name, value in kwargs.items()))
        key = (func, options, *((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors))
        return key, qkv, heads, not kwargs.get("skip_output_reshape", False)
