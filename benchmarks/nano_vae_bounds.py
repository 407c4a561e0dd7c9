"""What bounds the nano VAE: its 5-scale, 32-bit BSQ codes against simple codes of the same world.

Reconstructions of the same held-out ground-truth scenes (``recipe.eval_vae_scenes``' scenes), each
read by the pixel evaluator (the VAE "ceiling": all attributes right; shapes alone) and scored by
PSNR, from:

* the shipped nano VAE (encoder -> multi-scale bits -> summed codes -> decoder);
* PCA of 16x16x3 patches (the VAE's latent cell) kept continuous: what a linear 16x-downsampling
  encoder can carry with unlimited bits;
* the same PCA coefficients with a Lloyd-Max scalar quantiser per coefficient, at about the bits
  per patch the BSQ schedule spends (32 bits at 8x8, 32 at 6x6 shared by 64/36 patches, ...: 61);
* whitened PCA coefficients as the VAE's features, through the real multi-scale BSQ
  (``bsq.encode_multiscale``), decoded by the best linear map from the summed codes (3x3 cells of
  context, least squares on the training renders).

    python benchmarks/nano_vae_bounds.py [--train 3000] [--scenes 96]
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the repo on sys.path)
import mlx.core as mx
import numpy as np

from vargpt_mlx import api, schedules
from vargpt_mlx.models import bsq
from vargpt_mlx.nano import recipe, world

CELL = 16  # the VAE's downsampling: one latent cell per 16x16 patch
GRID = recipe.IMAGE_SIZE // CELL


def patches(imgs: np.ndarray) -> np.ndarray:
    """(N, 128, 128, 3) -> (N * 64, 768) patch rows, row-major over the 8x8 grid."""
    n = len(imgs)
    return imgs.reshape(n, GRID, CELL, GRID, CELL, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, CELL * CELL * 3)


def images(rows: np.ndarray) -> np.ndarray:
    rows = np.clip(rows, 0, 255).round().astype(np.uint8)
    return rows.reshape(-1, GRID, GRID, CELL, CELL, 3).transpose(0, 1, 3, 2, 4, 5).reshape(
        -1, recipe.IMAGE_SIZE, recipe.IMAGE_SIZE, 3)


def score(rec: np.ndarray, gt: np.ndarray, scenes: list) -> str:
    r = recipe.score_scenes(rec, gt, scenes)
    return f"{100 * r['all']:5.1f} % | {100 * r['shapes']:5.1f} % | {r['psnr']:5.2f} dB"


def lloyd_max(train: np.ndarray, levels: int, iters: int = 20) -> np.ndarray:
    lev = np.quantile(train, (np.arange(levels) + 0.5) / levels)
    for _ in range(iters):
        idx = np.searchsorted((lev[1:] + lev[:-1]) / 2, train)
        lev = np.array([train[idx == i].mean() if np.any(idx == i) else lev[i] for i in range(levels)])
    return lev


def quantise(x: np.ndarray, lev: np.ndarray) -> np.ndarray:
    return lev[np.searchsorted((lev[1:] + lev[:-1]) / 2, x)]


def summed_codes(z: np.ndarray, sched) -> np.ndarray:
    out = []
    for s in range(0, len(z), 256):
        _, _, cum = bsq.encode_multiscale(mx.array(z[s:s + 256]), sched)
        out.append(np.asarray(cum))
    return np.concatenate(out)


def context(codes: np.ndarray) -> np.ndarray:
    """(N, 8, 8, d) -> (N * 64, 9 d + 1): each cell's 3x3 neighbourhood (zero outside) and a 1."""
    p = np.pad(codes, [(0, 0), (1, 1), (1, 1), (0, 0)])
    f = np.concatenate([p[:, i:i + GRID, j:j + GRID] for i in range(3) for j in range(3)], -1)
    f = f.reshape(-1, f.shape[-1])
    return np.concatenate([f, np.ones((len(f), 1), f.dtype)], 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=3000, help="training renders for PCA / quantisers / decoders")
    ap.add_argument("--scenes", type=int, default=96, help="held-out ground-truth scenes scored")
    a = ap.parse_args()
    sched = schedules.get_schedule(recipe.PN)
    bits = sum(32 * h * w for h, w in sched) / GRID**2
    print(common.machine())
    rng = np.random.default_rng(0)
    tr = np.stack([np.asarray(world.render(world.sample_scene(rng, "train"), recipe.IMAGE_SIZE, rng), np.float32)
                   for _ in range(a.train)])
    ptr = patches(tr)
    mu = ptr.mean(0)
    sub = ptr[::4] - mu
    _, sv, vt = np.linalg.svd(sub, full_matrices=False)
    sd = sv / np.sqrt(len(sub))  # per-coefficient standard deviation

    scenes, gt = recipe.heldout_scenes(a.scenes)  # recipe.eval_vae_scenes' scenes
    q = patches(gt.astype(np.float32))

    print(f"\n{a.scenes} held-out scenes; the BSQ schedule {sched} spends {bits:.0f} bits per 16x16 patch\n")
    print("| code | evaluator reads the whole scene | shapes right | PSNR |")
    print("|---|---|---|---|")
    vae = api.load("nano").model.vae_local
    print(f"| shipped nano VAE (BSQ, {bits:.0f} bits / patch) | {score(recipe._reconstructions(vae, gt), gt, scenes)} |")
    for k in (16, 32, 48):
        rec = images(((q - mu) @ vt[:k].T) @ vt[:k] + mu)
        print(f"| PCA {k} coefficients, continuous | {score(rec, gt, scenes)} |")
    for k, b in ((16, 4), (21, 3), (32, 2), (64, 1)):
        ctr, c = sub @ vt[:k].T, (q - mu) @ vt[:k].T
        cq = np.stack([quantise(c[:, j], lloyd_max(ctr[:, j], 2**b)) for j in range(k)], 1)
        print(f"| PCA {k} x {b}-bit Lloyd-Max ({k * b} bits / patch) | {score(images(cq @ vt[:k] + mu), gt, scenes)} |")
    for k in (16, 32):
        def feats(p):
            z = np.zeros((len(p), 32), np.float32)
            z[:, :k] = (p - mu) @ vt[:k].T / sd[:k]
            return z.reshape(-1, GRID, GRID, 32)
        x = context(summed_codes(feats(ptr), sched))
        w = np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ ptr)
        rec = images(context(summed_codes(feats(q), sched)) @ w)
        print(f"| whitened PCA {k} through the BSQ, best linear decoder | {score(rec, gt, scenes)} |")


if __name__ == "__main__":
    main()
