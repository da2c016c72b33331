"""The toy VAE: ComfyUI's TAESD architecture with 16 latent channels ("taesd3"), fitted to the world.

    python -m toyworld.train_vae --out toyworld/weights --steps 600

ComfyUI's VAELoader offers it as "taesd3" once the two files sit in models/vae_approx/, and wraps it
with SD3's vae_scale / vae_shift, which cancel against SD3's latent format: the diffusion model sees
the encoder's output z = E(image in [0, 1]) and decodes D(z).

Encoder, in closed form: z is the whitened PCA of each 8 x 8 x 3 pixel patch (16 components, fitted
on training scenes), laid exactly into TAESD's layers: the first conv copies RGB, the three stride-2
convs move 2 x 2 neighbourhoods into channels (space-to-depth; 12, 48 channels), the last of them
projects the 192 patch values on +/- each component (ReLU keeps both halves), the final conv
subtracts and adds the bias; every residual block's branch is zero, so it is the identity on the
non-negative activations. Why closed form: TAESD's full-resolution convolutions cost about 1 s per
256 x 256 image on these CPUs, so gradient-training the encoder (and encoding a training set through
it) would eat the hour the diffusion model needs. The latents have zero mean and unit variance per
channel by construction, the scale rectified flow's noise assumes. `encode_fast` computes the same
map in numpy for training data; a test checks it against the TAESD network.

Decoder, trained by gradient descent (MSE, 64 x 64 crops, noise on z so imperfect samples decode).
"""
from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from anchordiff_core.anchors import PIXELS_PER_LATENT

from .comfy_env import import_comfy
from .world import SPLITS, make_scene

CHANNELS = 16  # latent channels; one latent per PIXELS_PER_LATENT x PIXELS_PER_LATENT pixels


def fit_pca(n_scenes: int = 300, size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mean [192], components [192, 16] (unit vectors), scale [16] (component std) from training
    scenes; patch vector layout as `patches`."""
    rows = [patches(make_scene(s, size).image) for s in SPLITS["train"].seeds(n_scenes)]
    x = np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows]).astype(np.float64)
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:CHANNELS]
    comps = vectors[:, order]
    comps *= np.sign(comps.sum(0, keepdims=True) + 1e-12)  # fixed sign: deterministic everywhere
    return mean.astype(np.float32), comps.astype(np.float32), np.sqrt(values[order]).astype(np.float32)


def patches(image_u8: np.ndarray) -> np.ndarray:
    """[H/8, W/8, 192] patch vectors of an image in [0, 1], ordered (c, Y, X, y, x, u, v) where the
    pixel offset in the patch is (4Y + 2y + u, 4X + 2x + v): the order space-to-depth builds."""
    h, w, _ = image_u8.shape
    a = image_u8.astype(np.float32).reshape(h // 8, 2, 2, 2, w // 8, 2, 2, 2, 3) / 255.0
    #                                  i   Y  y  u    j   X  x  v  c
    return a.transpose(0, 4, 8, 1, 5, 2, 6, 3, 7).reshape(h // 8, w // 8, 192)


def encode_fast(image_u8: np.ndarray, mean, comps, scale) -> np.ndarray:
    """[16, H/8, W/8]: what the closed-form TAESD encoder computes."""
    z = (patches(image_u8) - mean) @ comps / scale
    return z.transpose(2, 0, 1)


def build_taesd(mean, comps, scale, seed: int = 0):
    """TAESD(16) with the closed-form encoder and a He-initialised decoder."""
    import_comfy()
    from comfy.taesd.taesd import TAESD
    model = TAESD(latent_channels=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.named_parameters():
            if key.endswith(".bias"):
                t.zero_()
            elif key not in ("vae_scale", "vae_shift"):
                t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / t[0].numel()))
        for m in model.taesd_decoder.modules():  # residual branches start small
            if type(m).__name__ == "Block":
                m.conv[-1].weight.mul_(0.1)
        enc = model.taesd_encoder
        for p in enc.parameters():
            p.zero_()
        enc[0].weight[:3, :3, 1, 1] = torch.eye(3)                          # copy RGB
        for c in range(3):                                                  # 2x2 -> channels
            for y in range(2):
                for x in range(2):
                    enc[2].weight[(c * 2 + y) * 2 + x, c, 1 + y, 1 + x] = 1.0
        # stage C: channel of stage B (c, u, v) at offset (x-dir X, y-dir Y) -> (c, Y, X, u, v)
        for c in range(3):
            for Y in range(2):
                for X in range(2):
                    for u in range(2):
                        for v in range(2):
                            src = (c * 2 + u) * 2 + v
                            dst = (((c * 2 + Y) * 2 + X) * 2 + u) * 2 + v
                            enc[6].weight[dst, src, 1 + Y, 1 + X] = 1.0
        # stage D: patch index (c, Y, X, y, x, u, v) at offset (y, x) from stage C's (c, Y, X, u, v)
        w = torch.from_numpy(comps / scale)                                  # [192, 16]
        for c in range(3):
            for Y in range(2):
                for X in range(2):
                    for y in range(2):
                        for x in range(2):
                            for u in range(2):
                                for v in range(2):
                                    src = (((c * 2 + Y) * 2 + X) * 2 + u) * 2 + v
                                    idx = ((((((c * 2 + y) * 2 + x) * 2 + Y) * 2 + X) * 2 + u) * 2) + v  # offset 4y + 2Y + u
                                    enc[10].weight[:16, src, 1 + y, 1 + x] = w[idx]
                                    enc[10].weight[16:32, src, 1 + y, 1 + x] = -w[idx]
        enc[14].weight[:, :16, 1, 1] = torch.eye(16)
        enc[14].weight[:, 16:32, 1, 1] = -torch.eye(16)
        enc[14].bias.copy_(-torch.from_numpy(mean @ comps / scale))
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="toyworld/weights")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # small gradients go denormal and make CPU steps 10x slower
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    mean, comps, scale = fit_pca()
    np.savez(out / "vae_pca.npz", mean=mean, comps=comps, scale=scale)
    print(f"vae: PCA fitted ({time.monotonic() - t0:.0f} s); component std {np.round(scale[:4], 3)} ...", flush=True)
    model = build_taesd(mean, comps, scale)
    dec = model.taesd_decoder
    opt = torch.optim.Adam(dec.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    rng = np.random.default_rng(0)
    writer = csv.writer(open(out / "vae_loss.csv", "w", newline=""))
    writer.writerow(["step", "recon_mse", "seconds"])
    lat = args.crop // PIXELS_PER_LATENT
    for step in range(args.steps):
        xs, zs = [], []
        for s in rng.integers(SPLITS["train"].start, SPLITS["train"].stop, size=args.batch):
            img = make_scene(int(s), 256).image
            i, j = rng.integers(0, 32 - lat + 1, size=2)
            p = PIXELS_PER_LATENT
            crop = img[p * i:p * (i + lat), p * j:p * (j + lat)]
            xs.append(crop)
            zs.append(encode_fast(crop, mean, comps, scale))
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0
        z = torch.from_numpy(np.stack(zs))
        recon = dec(z + 0.1 * torch.randn_like(z))
        mse = torch.nn.functional.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        mse.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.monotonic() - t0
            writer.writerow([step, f"{mse.item():.5f}", f"{el:.0f}"])
            print(f"vae decoder step {step}/{args.steps} mse {mse.item():.5f} ({el:.0f} s)", flush=True)
    from safetensors.torch import save_file
    # fp16 files (half the size; the encoder's closed form then holds to about 1e-2 in latent units)
    save_file({k: v.half().contiguous() for k, v in model.taesd_encoder.state_dict().items()}, str(out / "taesd3_encoder.safetensors"))
    save_file({k: v.half().contiguous() for k, v in dec.state_dict().items()}, str(out / "taesd3_decoder.safetensors"))
    print(f"saved {out}/taesd3_{{encoder,decoder}}.safetensors in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
