"""Train the toy SD3: ComfyUI's MMDiT with SD3 Medium's conventions, on the world, by rectified flow.

    python -m toyworld.train_dit --out toyworld/weights --minutes 60      # resumable: run again to go on

The model is exactly what ComfyUI's UNETLoader builds from the saved file (detected as SD3):
hidden = 64 x depth, heads = depth (head dim 64), patch 2, 16 latent channels, SD3's 2D sin-cos
position table (cropped at the centre, pos_embed_max_size 64 = up to 1024 px), adaLN, a pre_only last
block, no qk-norm (SD3 Medium), 4096-wide text features through a linear context embedder, 2048-wide
pooled text through y_embedder. Training is SD3's rectified flow: x_t = (1 - t) x0 + t eps, the
network predicts eps - x0 at timestep 1000 t, t = shift(sigmoid(n)) with n ~ N(0, 1) (logit-normal)
and SD3's shift 3 (t' = 3t / (1 + 2t)), 10% of captions dropped to the empty prompt (for CFG).
x0 is the toy VAE's latent (toyworld.train_vae), the caption is encoded by toyworld.text through
ComfyUI's own SD3Tokenizer, as ComfyUI will encode it at inference. Deterministic by seed.

Writes into --out: toy_sd3.safetensors (EMA weights, fp16, bare ComfyUI keys), dit_loss.csv,
dit_state.pt (resume: model, EMA, optimiser, step, RNG states). Scenes are drawn fresh from the
training seed range at every step.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from .comfy_env import import_comfy
from .text import encode_lg, pooled_vector, tokenizer
from .world import SPLITS, make_scene

SHIFT = 3.0


def config(depth: int) -> dict:
    return {"depth": depth, "hidden": 64 * depth, "heads": depth, "patch": 2, "latent_channels": 16,
            "pos_embed_max_size": 64, "qk_norm": None, "context_dim": 4096, "pooled_dim": 2048}


def build_model(depth: int, seed: int = 0) -> torch.nn.Module:
    """ComfyUI's MMDiT, DiT-style init (xavier linears, zero adaLN modulation and output layer)."""
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT, get_2d_sincos_pos_embed
    cfg = config(depth)
    m = cfg["pos_embed_max_size"]
    model = MMDiT(
        input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=depth, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": cfg["hidden"]}},
        num_patches=m * m, pos_embed_max_size=m, pos_embed_scaling_factor=None, qk_norm=None,
        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.named_parameters():
            if key == "pos_embed":
                t.copy_(torch.from_numpy(get_2d_sincos_pos_embed(cfg["hidden"], m, scaling_factor=m / 64)).float()[None])
                t.requires_grad_(False)  # SD3's fixed table
            elif key.endswith(".bias"):
                t.zero_()
            elif t.dim() >= 2:
                fan_out, fan_in = t.shape[0], t[0].numel()
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                t.copy_((torch.rand(t.shape, generator=g) * 2 - 1) * bound)
            else:
                t.fill_(1.0)
            if "adaLN_modulation" in key or key.startswith("final_layer.linear"):
                t.zero_()
            if key.startswith("t_embedder.mlp") and key.endswith("weight"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    return model


def scene_batch(seeds, size: int, pca, ids):
    """Latents [B, 16, size/8, size/8] (the toy VAE's closed-form encoder) and CLIP-L/G token ids
    of the captions, drawn fresh for each step: every training scene is new."""
    from .train_vae import encode_fast
    lat, l_ids, g_ids = [], [], []
    for seed in seeds:
        scene = make_scene(int(seed), size)
        lat.append(encode_fast(scene.image, *pca))
        a, b = ids(scene.caption)
        l_ids.append(a)
        g_ids.append(b)
    return torch.from_numpy(np.stack(lat)), l_ids, g_ids


class TextCache:
    """Conditioning for token-id rows, as the toy CLIP computes it (toyworld.text)."""

    def __init__(self, ids):
        self.empty = ids("")

    def __call__(self, l_ids, g_ids, drop: bool):
        if drop:
            l_ids, g_ids = self.empty
        l_ids, g_ids = [int(i) for i in l_ids], [int(i) for i in g_ids]
        return encode_lg(l_ids, g_ids, context=True), pooled_vector(l_ids, g_ids)


def sample_t(n: int, g: torch.Generator) -> torch.Tensor:
    t = torch.sigmoid(torch.randn(n, generator=g))
    return SHIFT * t / (1 + (SHIFT - 1) * t)


def flow_loss(model, x0, context, pooled, t, eps):
    tt = t.view(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * eps
    v = model(xt, t * 1000.0, context=context, y=pooled)
    return torch.nn.functional.mse_loss(v, eps - x0)


def save_weights(model, path: Path) -> None:
    from safetensors.torch import save_file
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))


def committed_resume_point(out: Path) -> tuple[int, float]:
    """(step, training seconds) of the last row of the committed loss log, (0, 0) without one."""
    log_path = out / "dit_loss.csv"
    if not log_path.exists():
        return 0, 0.0
    rows = list(csv.DictReader(open(log_path)))
    return (int(rows[-1]["step"]), float(rows[-1]["seconds"])) if rows else (0, 0.0)


class Prefetch:
    """Renders and encodes the next batches in a background process while the model trains: the
    seeds are still drawn by the training loop (same scenes, same order as inline rendering)."""

    def __init__(self, size: int, pca, depth: int = 2):
        import multiprocessing as mp
        ctx = mp.get_context("fork")
        self.requests, self.results = ctx.Queue(), ctx.Queue(maxsize=depth)
        self.proc = ctx.Process(target=self._work, args=(size, pca), daemon=True)
        self.proc.start()
        self.pending = 0

    def _work(self, size, pca):
        torch.set_num_threads(1)
        ids = tokenizer()
        while True:
            seeds = self.requests.get()
            if seeds is None:
                return
            x0, l_ids, g_ids = scene_batch(seeds, size, pca, ids)
            self.results.put((x0.numpy(), l_ids, g_ids))

    def submit(self, seeds) -> None:
        self.requests.put(np.asarray(seeds))
        self.pending += 1

    def get(self):
        x0, l_ids, g_ids = self.results.get(timeout=600)
        self.pending -= 1
        return torch.from_numpy(x0), l_ids, g_ids

    def close(self) -> None:
        self.proc.terminate()  # it may hold a rendered batch nobody will read
        self.proc.join(timeout=10)


VAL_COLUMNS = ["step", "record_at", "phrase_ci_all", "phrase_ic_mean", "word_ci_all", "word_ic_mean",
               "phrase_true_centre_iou", "loss_running", "seconds"]


def validate(out: Path, step: int, scenes: int, record_at: float, running, seconds: float) -> dict:
    """Validation-split anchor accuracy of the EMA weights just saved in `out`, through the real
    ComfyUI capture path (toyworld.grounding in a subprocess: a clean ComfyUI, nothing of the
    training process shared). Appends a row to out/dit_val.csv."""
    import subprocess
    import sys
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        res_path = Path(tmp) / "val.json"
        cmd = [sys.executable, "-m", "toyworld.grounding", "--scenes", str(scenes), "--split", "val",
               "--record-at", str(record_at), "--weights", str(out), "--json", str(res_path)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       cwd=Path(__file__).resolve().parents[1])
        r = json.loads(res_path.read_text())
    acc, iou = r["anchor_accuracy"], r["mask_iou"]
    row = {"step": step, "record_at": record_at,
           "phrase_ci_all": acc["phrase"]["ci_all"], "phrase_ic_mean": acc["phrase"]["ic_mean"],
           "word_ci_all": acc["word"]["ci_all"], "word_ic_mean": acc["word"]["ic_mean"],
           "phrase_true_centre_iou": iou["phrase"]["true centre (upper bound)"],
           "loss_running": running, "seconds": round(seconds)}
    path = out / "dit_val.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=VAL_COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="toyworld/weights")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--max-steps", type=int, default=3000, help="the schedule's length (cosine decay)")
    p.add_argument("--minutes", type=float, default=60.0, help="stop (and save) after this long")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--warmup", type=int, default=100,
                   help="linear warm-up steps at the start and whenever the optimiser starts fresh")
    p.add_argument("--prefetch", type=int, default=None, choices=(0, 1),
                   help="1: render and encode scenes in a background process, 0: inline (default: 1 when "
                        "the machine has more cores than --threads; on 2 cores it measured no faster)")
    p.add_argument("--val-every", type=int, default=500,
                   help="steps between validation anchor-accuracy rows in dit_val.csv (0: never)")
    p.add_argument("--val-scenes", type=int, default=12)
    p.add_argument("--val-record-at", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.prefetch is None:
        args.prefetch = int((os.cpu_count() or 1) > args.threads)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # zero-initialised layers give denormal Adam moments: 10x slower steps
    stop = []  # SIGTERM / SIGINT: finish the step, save, exit
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pca_file = np.load(out / "vae_pca.npz")
    pca = (pca_file["mean"], pca_file["comps"], pca_file["scale"])
    t_start = time.monotonic()
    ids = tokenizer()
    model = build_model(args.depth, args.seed)
    ema = build_model(args.depth, args.seed)
    ema.load_state_dict(model.state_dict())
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99), foreach=True)
    warm_from = 0  # the step the current optimiser started at

    def lr_at(s):
        warm = min(1.0, (s - warm_from + 1) / args.warmup)
        return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.max_steps) / args.max_steps)))

    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    step, seconds_before = 0, 0.0
    state_path = out / "dit_state.pt"
    weights_path = out / "toy_sd3.safetensors"
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        warm_from = st.get("warm_from", 0)
        g.set_state(st["torch_rng"])
        rng = st["np_rng"]
        seconds_before = committed_resume_point(out)[1]
        print(f"dit: resumed at step {step} from {state_path}", flush=True)
    elif weights_path.exists() and committed_resume_point(out)[0] > 0:
        # The optimiser state is gone (another machine, a fresh clone): go on from the committed EMA
        # weights with a fresh AdamW and a short warm-up, on scenes the earlier periods did not draw.
        from safetensors.torch import load_file
        sd = {k: v.float() for k, v in load_file(str(weights_path)).items()}
        model.load_state_dict(sd)
        ema.load_state_dict(sd)
        step, seconds_before = committed_resume_point(out)
        warm_from = step
        g.manual_seed(args.seed * 1_000_003 + step)
        rng = np.random.default_rng([args.seed, step])
        print(f"dit: resumed at step {step} from the committed weights {weights_path} "
              f"(fresh optimiser, {args.warmup} warm-up steps)", flush=True)
    if step >= args.max_steps:
        print(f"dit: step {step} >= --max-steps {args.max_steps}: raise --max-steps to train on", flush=True)
        return 0
    (out / "toy_sd3.json").write_text(json.dumps({**config(args.depth), "trained_size": args.size}, indent=1))
    text = TextCache(ids)
    log_path = out / "dit_loss.csv"
    new_log = not log_path.exists() or step == 0
    log = open(log_path, "w" if new_log else "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["step", "loss", "lr", "seconds"])
    from tqdm import tqdm
    bar = tqdm(total=args.max_steps, initial=step, desc="toy SD3", mininterval=10)
    t0 = time.monotonic()
    val_seconds = 0.0  # time spent validating, not counted as training time
    running = None
    prefetch = Prefetch(args.size, pca) if args.prefetch else None

    def draw():
        seeds = rng.integers(SPLITS["train"].start, SPLITS["train"].stop, size=args.batch)
        drops = rng.random(args.batch) < 0.1
        if prefetch:
            prefetch.submit(seeds)
        return seeds, drops

    def train_seconds():
        return seconds_before + time.monotonic() - t0 - val_seconds

    def checkpoint():
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "warm_from": warm_from, "torch_rng": g.get_state(), "np_rng": rng}, state_path)
        save_weights(ema, weights_path)

    queue = [draw()] if prefetch else []
    while step < args.max_steps and (time.monotonic() - t0) / 60 < args.minutes and not stop:
        if prefetch:
            queue.append(draw())  # one batch ahead: rendered while this step trains
            seeds, drops = queue.pop(0)
            x0, l_ids, g_ids = prefetch.get()
        else:
            seeds, drops = draw()
            x0, l_ids, g_ids = scene_batch(seeds, args.size, pca, ids)
        conds = [text(a, b, d) for a, b, d in zip(l_ids, g_ids, drops)]
        context = torch.stack([c for c, _ in conds])
        pooled = torch.stack([q for _, q in conds])
        t = sample_t(args.batch, g)
        eps = torch.randn(x0.shape, generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = flow_loss(model, x0, context, pooled, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % 10 == 0:
            writer.writerow([step, f"{loss.item():.5f}", f"{lr_at(step):.2e}", f"{train_seconds():.0f}"])
            log.flush()
        if step % args.save_every == 0:
            checkpoint()
        if args.val_every and step % args.val_every == 0:
            checkpoint()
            v0 = time.monotonic()
            row = validate(out, step, args.val_scenes, args.val_record_at, running, train_seconds())
            val_seconds += time.monotonic() - v0
            print(f"\ndit: step {step} val phrase anchors ci_all {row['phrase_ci_all']:.3f} "
                  f"ic_mean {row['phrase_ic_mean']:.3f} ({time.monotonic() - v0:.0f} s)", flush=True)
    if prefetch:
        prefetch.close()
    checkpoint()
    bar.close()
    print(f"dit: step {step}, running loss {running}, {time.monotonic() - t_start:.0f} s; saved {out}/toy_sd3.safetensors", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
