"""The nano recipe: train a VARGPT of the real architecture from scratch on the shape world.

Stages (each resumable; ``vargpt-mlx train nano --out DIR`` runs them in order):

0. ``data``: our own BPE tokenizer and the world's train / held-out samples (sharegpt JSON + PNGs).
1. ``vae``: the BSQ VAE (encoder, multi-scale BSQ with straight-through bits, decoder) on fresh
   renders of whole scenes: at 32, then 64 (16x / 4x cheaper), then 128 px with the real 5-scale
   schedule. (Crops would be cheaper still, but a flat crop normalises to zero in the GroupNorms
   and loses its colour; measured: 9 dB after 100 crop steps.)
2. ``sft``: the whole unified model (VAE frozen) with full-parameter training on the mix of
   understanding, text-to-image and edit samples with upstream's losses (``sample_sft_loss``).
3. ``dpo``: LoRA DPO on right-vs-wrong image and answer pairs, fused into the weights.
4. ``eval`` + ``export``: the figures, and the model directory that ships as ``--model nano``.

Two deliberate departures from upstream's training recipe, both so that training computes what
inference computes (upstream fine-tuned a pretrained model and could afford the mismatch):

* positions: samples use the positions inference uses (M-RoPE for prompts with images,
  then plain cache positions for image tokens; see ``positions="inference"`` in
  ``training.losses``), not upstream's plain 0..T-1;
* classifier-free guidance: instead of upstream's cond drop (sos swapped for ``cfg_uncond[0]``
  with the prompt still visible), a fraction of generation samples train the unconditional
  branch exactly as ``autoregressive_infer_cfg`` runs it: no prompt, each scale alone through
  the LLM from position 0, cross-attention on raw ``cfg_uncond[:n]`` (``uncond_bit_loss``).

And one loss weighting: the bit CE weights each scale as Infinity's own trainer does
(``reweight_loss_by_scale``), where VARGPT's ``forward`` multiplies those weights into an
already-averaged loss (a no-op): from scratch, the plain mean never learned the first scale from
the prompt (``SFTArgs.reweight``).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .. import schedules
from ..config import VAEConfig
from ..models import bsq
from ..models.vae import BSQVAE
from ..training.callbacks import StepInfo, TrainingCallback
from ..training.lora import atomic_write_text, save_safetensors_atomic
from . import world

PN = "0.016M"  # 5 scales, (1,1)..(8,8): 128x128
IMAGE_SIZE = 128
Log = Callable[[str], None]

# ---------------------------------------------------------------------------- architecture
# Sizes were chosen by measuring step times on a 2-core CPU (see README "nano"): the smallest
# widths the architecture allows where it matters (Infinity C >= 128 for the attentive pool,
# VAE channels divisible by 24 for its GroupNorm rule), depth where it is cheap.
LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, mrope_section=[4, 6, 6])
VISION = dict(depth=2, embed_dim=64, num_heads=2)
INFINITY = dict(embed_dim=128, depth=4, num_heads=2, block_chunks=2, mlp_ratio=4, text_channels=128,
                drop_path_rate=0.0, cond_drop_rate=0.0)
# VAE widths: the GroupNorms take 32 or 24 groups whatever the width, so at 24 channels each group is
# one channel, i.e. every image is normalised per channel and a flat background loses its colour
# (measured: a base-24 VAE stayed at the predict-grey loss for 130 steps); at 48 channels each
# group holds 2, and it learns. num_res_blocks 0 keeps the full-resolution work to 3 convolutions.
VAE = dict(base_ch=48, encoder_ch_mult=[1, 1, 1, 1, 1], decoder_ch_mult=[1, 1, 2, 2, 2], num_res_blocks=0,
           codebook_dim=32, z_channels=32, patch_size=16)


# What the vision tower sees: every image (a 128 px render, a user's picture, an edit input) is
# resized by the Qwen2-VL processor to at most UND_PIXELS, stored as the model's
# ``preprocessor_config.json`` (upstream's format). Measured with a shape probe on the tower
# (``train_vision``): at 140 px (10x10 patches of 12.8 source px) a from-scratch tower stayed at
# chance for 700 steps; at 56 px it starts learning after ~1000 steps.
UND_PIXELS = 56 * 56


def preprocessor_config() -> dict:
    from ..image_processor import ImageProcessor

    p = ImageProcessor(min_pixels=28 * 28, max_pixels=UND_PIXELS)
    return {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
            "do_normalize": True, "do_convert_rgb": True, "image_mean": list(p.image_mean),
            "image_std": list(p.image_std), "min_pixels": p.min_pixels, "max_pixels": p.max_pixels,
            "patch_size": p.patch_size, "temporal_patch_size": p.temporal_patch_size,
            "merge_size": p.merge_size, "resample": p.resample, "rescale_factor": p.rescale_factor}


def vae_config() -> VAEConfig:
    d = dict(VAE)
    d["encoder_ch_mult"] = tuple(d["encoder_ch_mult"])
    d["decoder_ch_mult"] = tuple(d["decoder_ch_mult"])
    return VAEConfig(**d)


def model_config(special_ids: dict[str, int], vocab_size: int) -> dict:
    """``config.json`` of the nano model (upstream's fields + the Infinity / VAE / pn blocks a
    converted directory carries)."""
    s = special_ids
    return {
        "architectures": ["VARGPTQwen2VLForConditionalGeneration"],
        "model_type": "vargpt_qwen2_vl",
        "format": "mlx",
        "bos_token_id": s["<|endoftext|>"], "pad_token_id": s["<|endoftext|>"], "eos_token_id": s["<|im_end|>"],
        "image_token_id": s["<|image_pad|>"], "video_token_id": s["<|video_pad|>"],
        "vision_start_token_id": s["<|vision_start|>"], "vision_end_token_id": s["<|vision_end|>"],
        "vision_token_id": s["<|vision_pad|>"],
        "special_tokens": {
            "image_gen_start": "<|image_gen_start|>", "image_gen_start_token_id": s["<|image_gen_start|>"],
            "image_gen_end": "<|image_gen_end|>", "image_gen_end_token_id": s["<|image_gen_end|>"],
            "image_gen_pad": "<|image_gen_pad|>", "image_gen_pad_token_id": s["<|image_gen_pad|>"],
        },
        "vocab_size": vocab_size,
        **{k: v for k, v in LLM.items() if k != "mrope_section"},
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": LLM["mrope_section"]},
        "tie_word_embeddings": False,
        "vision_config": {**VISION, "hidden_size": LLM["hidden_size"]},
        "infinity": dict(INFINITY),
        "vae": dict(VAE),
        "pn": PN,
    }


# ---------------------------------------------------------------------------- stage state
def _save_state(path: Path, arrays: dict[str, mx.array], meta: dict) -> None:
    save_safetensors_atomic(path, arrays, {"nano_state": json.dumps(meta)})


def _load_state(path: Path) -> tuple[dict[str, mx.array], dict] | None:
    if not path.is_file():
        return None
    arrays, md = mx.load(str(path), return_metadata=True)
    return arrays, json.loads(md["nano_state"])


def _lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warmup then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 60}:{s % 60:02d}"


class _SmoothedLog(TrainingCallback):
    """The SFT / DPO progress line: loss and metrics smoothed (EMA, ``weight`` on the newest
    value), every ``every`` updates and at the last one."""

    def __init__(self, name: str, log: Log, *, weight: float, every: int, show_lr: bool = False):
        self.name, self.log, self.weight, self.every, self.show_lr = name, log, weight, every, show_lr
        self.ema: dict[str, float] = {}

    def on_step(self, p: StepInfo) -> None:
        for k, v in {"loss": p.loss, **p.metrics}.items():
            self.ema[k] = v if k not in self.ema else (1 - self.weight) * self.ema[k] + self.weight * v
        if p.step % self.every == 0 or p.step == p.iters:
            ms = " ".join(f"{k} {v:.3f}" for k, v in self.ema.items())
            lr = f" lr {p.learning_rate:.2e}" if self.show_lr else ""
            self.log(f"{self.name} {p.step}/{p.iters} {ms}{lr} elapsed {_fmt_time(p.elapsed)} eta {_fmt_time(p.eta)}")


# ---------------------------------------------------------------------------- the stage-1 loop
def _train_stage(name: str, module: nn.Module, loss_fn: Callable, batch_fn: Callable, *, steps: int, lr: float,
                 warmup: int, state_file: Path, meta: dict, save_every: int, log: Log, log_every: int = 25,
                 note: Callable[[int], str] = lambda step: "") -> None:
    """The loop the VAE, decoder and vision stages share: resume (weights + Adam state) from
    ``state_file``, then per step ``loss_fn(module, *batch_fn(step))`` under warmup + cosine
    (``_lr``), a finite-loss check, a checkpoint every ``save_every`` steps and a progress line
    every ``log_every`` (``note(step)`` appended). Batches depend only on the step, so a resumed
    run draws what an uninterrupted one would."""
    from mlx.utils import tree_unflatten

    opt = optim.Adam(learning_rate=lr)
    start = 0
    if (st := _load_state(state_file)) is not None:
        arrays, saved = st
        module.load_weights([(k[2:], v) for k, v in arrays.items() if k.startswith("w.")])
        opt.init(module.trainable_parameters())
        opt.state = tree_unflatten([(k[2:], v) for k, v in arrays.items() if k.startswith("o.")])
        start = saved["step"]
        log(f"{name}: resuming at step {start}/{steps}")
    mx.eval(module.parameters())
    lg = nn.value_and_grad(module, loss_fn)
    t0, ema = time.perf_counter(), None
    for step in range(start, steps):
        batch = batch_fn(step)
        opt.learning_rate = _lr(step, steps, lr, warmup, floor=0.1)
        loss, grads = lg(module, *batch)
        opt.update(module, grads)
        mx.eval(module.parameters(), opt.state, loss)
        lv = loss.item()
        if not math.isfinite(lv):
            raise RuntimeError(f"{name}: loss is {lv} at step {step + 1}; the last checkpoint is kept")
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        last = step + 1 == steps
        if (step + 1) % save_every == 0 or last:
            arrays = {f"w.{k}": v for k, v in tree_flatten(module.parameters())}
            arrays.update({f"o.{k}": v for k, v in tree_flatten(opt.state)})
            _save_state(state_file, arrays, {"step": step + 1, **meta})
        if (step + 1) % log_every == 0 or last:
            el = time.perf_counter() - t0
            log(f"{name} {step + 1}/{steps} loss {ema:.4f}{note(step)} elapsed {_fmt_time(el)} "
                f"eta {_fmt_time(el / (step + 1 - start) * (steps - step - 1))}")


# ---------------------------------------------------------------------------- stage 1: VAE
@dataclass
class VAEArgs:
    # (image size, batch, steps): whole scenes at 32, then 64, then 128 px. Small renders are 16x
    # / 4x cheaper per image, and a 16x16 latent cell is decoded the same way at every size. At 128 px
    # alone the first ~400 steps (6.1 of 20.5 min) stayed on the predict-grey plateau (loss 0.62-0.74;
    # the GroupNorms, 2 channels per group, normalise a flat colour to a sign pattern); at 32 px the
    # loss is 0.70 at step 100 (26 s) and 0.46 at step 400 (1.8 min). Measured, same seed, idle:
    # 128 px alone (1,500 steps) 20.5 min to loss 0.132, 21.98 dB held-out, VAE ceiling 10 % of 96
    # scenes; these phases 18.6 min to 0.126, 22.14 dB, 14 % (within noise: the gain is the time).
    # (Tried, not kept: each ResnetBlock's conv2 zero-initialised: ahead by ~200 steps at step 900,
    # behind from ~1,300 on (0.150 vs 0.143 at 1,350), 21.49 dB at the end.)
    phases: tuple = ((32, 16, 400), (64, 8, 200), (128, 4, 1100))
    lr: float = 2e-4  # measured: 2e-3 and 4e-4 stalled at the predict-the-mean loss; 1e-4..2e-4 learn
    #                  (with the phases too: 4e-4 at 32 px, loss 0.91 at step 400 against 0.46)
    seed: int = 0
    save_every: int = 25


# 5-scale schedules for the 2x2 / 4x4 latents of 32 / 64 px scenes: five unit-norm codes per
# position are summed, as with the real (1,1)..(8,8) schedule, so the decoder sees sums of the
# same kind.
SMALL_SCHEDULES = {32: [(1, 1), (1, 1), (2, 2), (2, 2), (2, 2)], 64: [(1, 1), (2, 2), (2, 2), (3, 3), (4, 4)]}


def _render_batch(rng: np.random.Generator, n: int, size: int | None) -> mx.array:
    size = size or IMAGE_SIZE
    out = np.stack([np.asarray(world.render(world.sample_scene(rng, "train"), size, rng), np.float32)
                    for _ in range(n)])
    return mx.array(out / 127.5 - 1.0)


def vae_reconstruct(vae: BSQVAE, x: mx.array, schedule=None) -> mx.array:
    """What generation decodes: encoder -> multi-scale bits -> summed codes -> decoder."""
    schedule = schedule or schedules.get_schedule(PN)
    bits, _, _ = bsq.encode_multiscale(vae.encode_features(x), schedule)
    return vae.decode(bsq.codes_from_bits(bits, schedule))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


def _reconstructions(vae: BSQVAE, imgs: np.ndarray, batch: int = 16) -> np.ndarray:
    """uint8 ``vae_reconstruct`` of uint8 images (rounded, like save_image), ``batch`` at a time."""
    out = []
    for s in range(0, len(imgs), batch):
        rec = vae_reconstruct(vae, mx.array(imgs[s:s + batch].astype(np.float32) / 127.5 - 1.0))
        out.append(np.asarray(((rec + 1) / 2 * 255).round().astype(mx.uint8)))
    return np.concatenate(out)


def eval_vae(vae: BSQVAE, n: int = 64, seed: int = 999, split: str = "heldout") -> float:
    """Mean PSNR (dB, uint8 images) of ``vae_reconstruct`` on ``n`` fresh renders."""
    rng = np.random.default_rng(seed)
    vals = []
    for s in range(0, n, 16):
        imgs = np.stack([np.asarray(world.render(world.sample_scene(rng, split), IMAGE_SIZE, rng))
                         for _ in range(min(16, n - s))])
        vals += [psnr(a, b) for a, b in zip(imgs, _reconstructions(vae, imgs))]
    return float(np.mean(vals))


def heldout_scenes(n: int, seed: int = 5) -> tuple[list, np.ndarray]:
    """``n`` held-out scenes and their uint8 renders: the ones ``eval_vae_scenes`` scores."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, "heldout") for _ in range(n)]
    return scenes, np.stack([np.asarray(world.render(sc, IMAGE_SIZE, rng)) for sc in scenes])


def score_scenes(rec: np.ndarray, imgs: np.ndarray, scenes: list) -> dict:
    """The pixel evaluator on reconstructions ``rec`` of the renders ``imgs`` of ``scenes``: the
    share read right whole (as ``check_generation`` of a Scene), the parts
    (``evaluate.generation_parts``) and the mean PSNR."""
    from . import evaluate as ev

    found = [ev.analyze(r) for r in rec]
    ok = [ev.scene_matches(f, ev.as_spec(sc)) for f, sc in zip(found, scenes)]
    parts = [ev.generation_parts(f, sc) for f, sc in zip(found, scenes)]
    return {"all": float(np.mean(ok)), **{k: float(np.mean([p[k] for p in parts])) for k in parts[0]},
            "psnr": float(np.mean([psnr(g, r) for g, r in zip(imgs, rec)])), "n": len(scenes)}


def eval_vae_scenes(vae: BSQVAE, n: int = 48, seed: int = 5) -> dict:
    """The ceiling the VAE puts on drawing: ``score_scenes`` of ``vae_reconstruct`` on ``n``
    held-out ground-truth scenes."""
    scenes, imgs = heldout_scenes(n, seed)
    return score_scenes(_reconstructions(vae, imgs), imgs, scenes)


def train_vae(out: Path, args: VAEArgs = VAEArgs(), log: Log = print) -> BSQVAE:
    """Stage 1; resumable from ``out/vae_state.safetensors``. Returns the trained VAE."""
    out.mkdir(parents=True, exist_ok=True)
    state_file, done_file = out / "vae_state.safetensors", out / "vae.safetensors"
    vae = BSQVAE(vae_config())
    if done_file.is_file():
        vae.load_weights(str(done_file))
        return vae
    mx.random.seed(args.seed)
    vae = BSQVAE(vae_config())
    plan = [(size, batch) for size, batch, steps in args.phases for _ in range(steps)]
    full_sched = schedules.get_schedule(PN)

    def loss_fn(model, x, sched):
        q, _ = bsq.msbsq_forward(model.encoder(x), sched)
        y = model.decoder(q)
        return mx.mean(mx.abs(y - x)) + mx.mean((y - x) ** 2)

    def batch_fn(step):
        size, batch = plan[step]
        return _render_batch(np.random.default_rng([args.seed, step]), batch, size), \
            SMALL_SCHEDULES.get(size, full_sched)

    _train_stage("vae", vae, loss_fn, batch_fn, steps=len(plan), lr=args.lr, warmup=20, state_file=state_file,
                 meta={"args": asdict(args)}, save_every=args.save_every, log=log,
                 note=lambda step: f" ({plan[step][0]}px)")
    p = eval_vae(vae)
    log(f"vae: held-out reconstruction PSNR {p:.2f} dB")
    save_safetensors_atomic(done_file, dict(tree_flatten(vae.parameters())), {"psnr": f"{p:.3f}"})
    return vae


@dataclass
class DecoderArgs:
    steps: int = 900  # decoder-only refinement at 128 px (before stage 2, see run_recipe); 1,800 steps
    #                  took 19.8 min for a ceiling of 25 % against 23 % at 900 (see edge_weight)
    batch: int = 4
    lr: float = 2e-4
    # pixels within 3 px of an edge of the target weigh 1 + edge_weight: they are 11 % of the
    # pixels and held 76 % of the squared error of the unweighted refinement (16 held-out scenes),
    # whose drawings the evaluator read as the right shapes in 17 % of 48 reconstructions (edge
    # weighted: 23 % after 900 steps, 25 % after 1800, PSNR 23.6 -> 24.3 dB)
    edge_weight: float = 4.0
    seed: int = 1
    save_every: int = 25


def edge_weights(x: np.ndarray, weight: float, radius: int = 3, step: float = 30 / 127.5) -> np.ndarray:
    """(B, H, W) per-pixel loss weights of images ``x`` (B, H, W, 3) in [-1, 1]: 1, plus ``weight``
    within ``radius`` px (4-neighbour dilation) of a pixel whose RGB differs from a 4-neighbour's by
    more than ``step`` (summed over channels; 30 grey levels)."""
    d = np.zeros(x.shape[:3], bool)
    g = np.abs(np.diff(x, axis=1)).sum(-1) > step
    d[:, 1:] |= g
    d[:, :-1] |= g
    g = np.abs(np.diff(x, axis=2)).sum(-1) > step
    d[:, :, 1:] |= g
    d[:, :, :-1] |= g
    for _ in range(radius):
        e = d.copy()
        e[:, 1:] |= d[:, :-1]
        e[:, :-1] |= d[:, 1:]
        e[:, :, 1:] |= d[:, :, :-1]
        e[:, :, :-1] |= d[:, :, 1:]
        d = e
    return 1.0 + weight * d.astype(np.float32)


def train_decoder(out: Path, args: DecoderArgs = DecoderArgs(), log: Log = print) -> Path:
    """Stage 1b (resumable): the decoder alone, encoder frozen, on exactly what generation decodes
    (``codes_from_bits`` of the encoder's multi-scale bits). The bits, and so every generation
    target of stage 2, depend only on the encoder."""
    done, state_file = out / "vae_decoder.safetensors", out / "vae_decoder_state.safetensors"
    if done.is_file():
        return done
    vae = BSQVAE(vae_config())
    vae.load_weights(str(out / "vae.safetensors"))
    vae.encoder.freeze()
    sched = schedules.get_schedule(PN)

    def loss_fn(model, codes, x, w):
        e = model.decoder(codes) - x
        return mx.mean(w[..., None] * (mx.abs(e) + e * e)) / mx.mean(w)

    def batch_fn(step):
        x = _render_batch(np.random.default_rng([args.seed, step]), args.batch, IMAGE_SIZE)
        bits, _, _ = bsq.encode_multiscale(vae.encode_features(x), sched)
        w = mx.array(edge_weights(np.asarray(x), args.edge_weight))
        return mx.stop_gradient(bsq.codes_from_bits(bits, sched)), x, w

    _train_stage("vae decoder", vae, loss_fn, batch_fn, steps=args.steps, lr=args.lr, warmup=10,
                 state_file=state_file, meta={"args": asdict(args)}, save_every=args.save_every, log=log)
    p = eval_vae(vae)
    log(f"vae decoder: held-out reconstruction PSNR {p:.2f} dB")
    save_safetensors_atomic(done, dict(tree_flatten(vae.parameters())), {"psnr": f"{p:.3f}"})
    return done


def swap_vae(model_dir: Path, vae_file: Path) -> None:
    """Put the refined VAE into a model directory (atomic rewrite of its weights file)."""
    f = model_dir / "model.safetensors"
    weights = dict(mx.load(str(f)))
    for k, v in mx.load(str(vae_file)).items():
        weights[f"vae_local.{k}"] = v
    save_safetensors_atomic(f, weights, {"format": "mlx"})


# ---------------------------------------------------------------------------- stage 1c: vision tower
@dataclass
class VisionArgs:
    steps: int = 8000  # measured: shape right on 55 % of fresh renders after 3000 steps, 98 % after 8000
    batch: int = 8
    lr: float = 1e-3
    seed: int = 2
    save_every: int = 250


def scene_labels(scene: world.Scene) -> tuple[int, int, np.ndarray]:
    """Targets of a one-object scene: shape index, colour index, multi-hot background colours."""
    o = scene.objects[0]
    bg = np.zeros(len(world.COLOUR_NAMES), np.float32)
    bg[[world.COLOUR_NAMES.index(c) for c in scene.background]] = 1
    return world.SHAPES.index(o.shape), world.COLOUR_NAMES.index(o.colour), bg


class _VisionProbe(nn.Module):
    """The tower plus linear heads (shape, colour, background) on its mean merged feature; the
    heads are dropped after the stage."""

    def __init__(self, visual: nn.Module, hidden: int):
        super().__init__()
        self.visual = visual
        nc = len(world.COLOUR_NAMES)
        self.head = nn.Linear(hidden, len(world.SHAPES) + 2 * nc)

    def __call__(self, pvs: list[mx.array], grid: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        z = mx.stack([self.head(self.visual(pv, grid).mean(axis=0)) for pv in pvs])
        ns, nc = len(world.SHAPES), len(world.COLOUR_NAMES)
        return z[:, :ns], z[:, ns:ns + nc], z[:, ns + nc:]


def train_vision(out: Path, config_dict: dict, args: VisionArgs = VisionArgs(), log: Log = print) -> Path:
    """Stage 1c (resumable): pretrain the vision tower on fresh renders with the world's labels
    (shapes, colours, background), as Qwen2-VL's tower was pretrained before its VLM stage.

    Why: from scratch inside SFT the tower never learned shape (understanding stayed at the
    answer prior, ~22 %). A shape's pixels are ``bg + (fg - bg) * mask``: with fg and bg drawn
    from 8 colours, the sign of every linear patch feature flips with the colours, so gradients
    average out at initialisation (measured: a shape probe stays at chance for ~1000 steps on
    random colours, learns in 200 on white-on-black). Direct labels get it past that plateau.

    Tried and not kept (commit 97c7cd4): labels for everything the questions ask (per shape:
    present, colour, position, size; one- and two-object scenes). A from-scratch LLM trained on
    the understanding samples alone answered 63 % of 150 held-out questions on that tower, 43 % on
    this one (positions 71 % vs 24 %, shapes 79 % vs 42 %), and whole recipe runs on it answered
    57-60 % (this recipe: 48 %), but drew the objects' colours in 16 % and 27 % of held-out prompts
    (two runs; this recipe: 68 %) at the same final bit loss."""
    from ..image_processor import ImageProcessor

    done, state_file = out / "vision.safetensors", out / "vision_state.safetensors"
    if done.is_file():
        return done
    model = init_model(config_dict, None, seed=args.seed)
    proc = ImageProcessor.from_dir(out / "tokenizer")
    probe = _VisionProbe(model.visual, config_dict["hidden_size"])

    def batch(rng, n):
        scenes = [world.sample_scene(rng, "train", n_objects=1) for _ in range(n)]
        pvs, grid = [], None
        for sc in scenes:
            pv, grid = proc([world.render(sc, IMAGE_SIZE, rng)])
            pvs.append(mx.array(pv))
        shape, colour, bg = zip(*map(scene_labels, scenes))
        return pvs, mx.array(grid), (mx.array(shape), mx.array(colour), mx.array(np.stack(bg)))

    def loss_fn(m, pvs, grid, y):
        s, c, b = m(pvs, grid)
        ce = nn.losses.cross_entropy
        return (ce(s, y[0]).mean() + ce(c, y[1]).mean()
                + nn.losses.binary_cross_entropy(b, y[2], with_logits=True, reduction="sum") / len(pvs))

    def accuracy(m, pvs, grid, y):  # shape, colour
        s, c, _ = m(pvs, grid)
        return (float(mx.mean(mx.argmax(s, -1) == y[0]).item()), float(mx.mean(mx.argmax(c, -1) == y[1]).item()))

    def note(step):
        a = accuracy(probe, *val)
        return f" shape {a[0]:.2f} colour {a[1]:.2f}"

    val = batch(np.random.default_rng([args.seed, 10**6]), 64)
    _train_stage("vision", probe, loss_fn, lambda step: batch(np.random.default_rng([args.seed, step]), args.batch),
                 steps=args.steps, lr=args.lr, warmup=100, state_file=state_file, meta={"args": asdict(args)},
                 save_every=args.save_every, log=log, log_every=args.save_every, note=note)
    acc = accuracy(probe, *val)
    log(f"vision: shape right on {100 * acc[0]:.0f} %, colour on {100 * acc[1]:.0f} % of 64 fresh renders")
    save_safetensors_atomic(done, dict(tree_flatten(model.visual.parameters())),
                            {"shape_accuracy": f"{acc[0]:.3f}", "colour_accuracy": f"{acc[1]:.3f}"})
    return done


# ---------------------------------------------------------------------------- stage 0: data
@dataclass
class DataArgs:
    seed: int = 0
    n_und: int = 6000
    n_t2i: int = 3000
    n_edit: int = 2000
    n_dpo_img: int = 600
    n_dpo_txt: int = 600
    n_heldout: int = 200  # per kind, held-out split
    vocab: int = 512  # ordinary BPE tokens (the special tokens follow)


def make_data(out: Path, args: DataArgs = DataArgs(), log: Log = print) -> dict:
    """Stage 0: tokenizer + train / held-out samples. Skipped when ``out/data/done.json`` exists."""
    from .tokenizer import build_nano_tokenizer

    data, done = out / "data", out / "data" / "done.json"
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer" / "preprocessor_config.json", json.dumps(preprocessor_config(), indent=1))
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    tok_dir = out / "tokenizer"
    special = build_nano_tokenizer(tok_dir, world.corpus(args.seed, 20000), vocab_size=args.vocab)
    train = world.write_dataset(data / "train", seed=args.seed, split="train", n_und=args.n_und,
                                n_t2i=args.n_t2i, n_edit=args.n_edit, n_dpo_img=args.n_dpo_img,
                                n_dpo_txt=args.n_dpo_txt, size=IMAGE_SIZE)
    held = world.write_dataset(data / "heldout", seed=args.seed + 1, split="heldout", n_und=args.n_heldout,
                               n_t2i=args.n_heldout, n_edit=args.n_heldout, n_dpo_img=0, n_dpo_txt=0,
                               size=IMAGE_SIZE)
    info = {"special_ids": special, "vocab_size": max(special.values()) + 1,
            "train": {k: str(v) for k, v in train.items()}, "heldout": {k: str(v) for k, v in held.items()},
            "args": asdict(args)}
    atomic_write_text(done, json.dumps(info, indent=1))
    log(f"data: tokenizer ({info['vocab_size']} ids) and samples written in {time.perf_counter() - t0:.0f} s")
    return info


# ---------------------------------------------------------------------------- stage 2: SFT
@dataclass
class SFTArgs:
    iters: int = 4000  # 0.37-0.42 s per step idle (two runs); the shipped run's count (3,700 while the VAE took 20.5 min)
    batch_size: int = 8
    lr: float = 7e-4
    warmup: int = 100
    p_uncond: float = 0.15  # generation samples that train the unconditional branch instead
    und_repeat: int = 2
    gen_repeat: int = 3  # measured: 1,100 more generation-only steps took object colours from 17 % to 57 %
    # Infinity's per-scale loss weights (``training.losses.bit_ce``), not VARGPT's plain mean, in
    # which the 1x1 scale that sets the background is 1 token of 121. Measured: with the plain mean
    # the SFT model's 1x1-scale bit CE was 0.68 nats (chance 0.69) with the right prompt and the
    # same with another sample's; 300 more steps with the weights: 0.14 vs 2.08.
    reweight: bool = True
    # (Tried, not kept: upstream's bitwise self-correction, flip strength 0.3 on every generation
    # sample, labels and teacher inputs re-derived each step with ``training.data.flip_requant``.
    # Same stages as the 61.2-min run, held-out n 100: understanding 47 % (48 without), drawings 2 %
    # (4), argmax 1 % (5), edits 1 % (0), object colours 58 % (58), shapes 7 % (7): no gain.)
    seed: int = 0
    save_every: int = 100


def init_model(config_dict: dict, vae_weights: Path | None = None, seed: int = 0,
               vision_weights: Path | None = None):
    """A from-scratch VARGPT of the nano sizes (MLX default inits, upstream's for Infinity's
    learned constants), with the stage-1 VAE loaded."""
    from ..config import VARGPTConfig
    from ..models.vargpt import VARGPT

    mx.random.seed(seed)
    model = VARGPT(VARGPTConfig.from_dict(config_dict))
    inf = model.vargpt_gen
    inf.cfg_uncond = 0.02 * mx.random.normal(inf.cfg_uncond.shape)
    inf.pos_start = 0.02 * mx.random.normal(inf.pos_start.shape)
    if vae_weights is not None:
        model.vae_local.load_weights(str(vae_weights))
    if vision_weights is not None:
        model.visual.load_weights(str(vision_weights))
    mx.eval(model.parameters())
    return model


def write_model_dir(model, config_dict: dict, tok_dir: Path, out_dir: Path, extra: dict | None = None) -> Path:
    """A converted-format model directory (config.json with format "mlx", one safetensors file,
    tokenizer files), written under a temporary name and renamed at the end."""
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps({**config_dict, **(extra or {})}, indent=1))
    for f in Path(tok_dir).iterdir():
        shutil.copy(f, tmp / f.name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


class NanoTask:
    """The SFT mix as one trainer task: every sample with upstream's per-sample loss at
    inference positions; with probability ``p_uncond`` (a function of (seed, step, item)) a
    generation sample trains the unconditional branch instead (``uncond_bit_loss``)."""

    def __init__(self, processor, train: list, val: list | None, *, p_uncond: float, seed: int, reweight: bool):
        self.processor, self.train_items, self.val_items = processor, train, list(val or [])
        self.p_uncond, self.seed, self.step, self.reweight = p_uncond, seed, 0, reweight
        self.n_train, self.n_val = len(train), len(self.val_items)

    def begin_step(self, step: int) -> None:
        self.step = step

    def num_tokens(self, idxs: list[int]) -> int:
        return sum(self.train_items[i].sample.num_tokens for i in idxs)

    def item_loss(self, model, it, uncond: bool = False):
        from ..training.losses import BIT_LOSS_WEIGHT, sample_sft_loss, uncond_bit_loss

        s, t = it.sample, it.target
        if uncond:
            tok = model.config.tokens
            n_mem = int(np.nonzero(s.input_ids == tok.image_gen_start_token_id)[0][0])
            bit = uncond_bit_loss(model, t.x_wo_prefix, t.gt_bits, s.schedule, n_mem, self.reweight)
            return BIT_LOSS_WEIGHT * bit, {"uncond_ce": bit}
        pv, grid = it.arrays(self.processor)
        out = sample_sft_loss(model, mx.array(s.input_ids[None]), s.labels[None],
                              gt_bits=None if t is None else t.gt_bits,
                              x_wo_prefix=None if t is None else t.x_wo_prefix, schedule=s.schedule,
                              pixel_values=pv, image_grid_thw=grid, text_loss="assistant", positions="inference",
                              reweight=self.reweight)
        m = {"text_ce": out.text_ce}
        if out.bit_ce is not None:
            m["bit_ce"] = out.bit_ce
        return out.loss, m

    def batch_loss(self, model, idxs: list[int]):
        losses, metrics = [], {}
        for i in idxs:
            it = self.train_items[i]
            rng = np.random.default_rng([self.seed, self.step, i])
            uncond = it.target is not None and rng.random() < self.p_uncond
            loss, m = self.item_loss(model, it, uncond)
            losses.append(loss)
            for k, v in m.items():
                metrics.setdefault(k, []).append(v)
        return mx.mean(mx.stack(losses)), {k: mx.mean(mx.stack(v)) for k, v in metrics.items()}

    def evaluate(self, model, limit: int = -1) -> dict[str, float]:
        items = self.val_items if limit < 0 else self.val_items[:limit]
        vals = [self.item_loss(model, it)[0].item() for it in items]
        return {"val_loss": float(np.mean(vals)) if vals else float("nan")}


def encode_targets_batched(model, samples: list, cache, batch: int = 32, log: Log = print) -> None:
    """Fill ``cache`` with the GT bits of every generation target, the VAE run in batches on the
    exact 128x128 pixels (the world's images already have the schedule's size, so upstream's
    1.125x resize-and-crop, which would cut objects at the border, is not applied)."""
    from ..image_processor import load_image
    from ..training.data import GenTarget

    todo, seen = [], set()
    for s in samples:
        if s.gen_image is None:
            continue
        key = cache.key(s.gen_image, s.schedule)
        if key not in cache and key not in seen:
            seen.add(key)
            todo.append((key, s.gen_image, s.schedule))
    t0 = time.perf_counter()
    for b in range(0, len(todo), batch):
        chunk = todo[b:b + batch]
        x = np.stack([np.asarray(load_image(p).convert("RGB"), np.float32) / 127.5 - 1.0 for _, p, _ in chunk])
        feats = model.vae_local.encode_features(mx.array(x))
        sched = chunk[0][2]
        bits, x_wo, _ = bsq.encode_multiscale(feats, sched)
        gt = mx.concatenate([bb.reshape(bb.shape[0], -1, bb.shape[-1]) for bb in bits], axis=1)
        mx.eval(gt, x_wo, feats)
        for j, (key, _, s) in enumerate(chunk):
            cache.put(key, GenTarget(gt[j:j + 1], x_wo[j:j + 1], feats[j:j + 1], list(s)))
        if (b // batch) % 20 == 0:
            log(f"sft: encoded {min(b + batch, len(todo))}/{len(todo)} target images "
                f"({time.perf_counter() - t0:.0f} s)")


def _pipeline(model, tok_dir: Path):
    from ..api import Pipeline
    from ..image_processor import ImageProcessor
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir, eos_token_ids=[model.config.tokens.eos_token_id])
    return Pipeline(model=model, tokenizer=tok, processor=ImageProcessor.from_dir(tok_dir), path=tok_dir,
                    adapter_path=None)


def _items(pipe, files: list[Path], cache, log: Log):
    from ..training import run
    from ..training.data import Batchable, load_sft_records

    enc = run._encoder(pipe, PN, None)
    samples = [enc.encode_sft(r) for f in files for r in load_sft_records(f, pipe.processor)]
    encode_targets_batched(pipe.model, samples, cache, log=log)
    return [Batchable(s, cache.get(pipe.model, s.gen_image, s.schedule) if s.gen_image is not None else None)
            for s in samples]


def train_sft(out: Path, data: dict, args: SFTArgs = SFTArgs(), log: Log = print):
    """Stage 2 (resumable from ``out/sft``): full-parameter training of everything but the VAE."""
    from ..training import trainer
    from ..training.data import TargetCache
    from ..training.lora import LoraConfig

    sft_dir, final = out / "sft", out / "sft_model"
    cfg = model_config(data["special_ids"], data["vocab_size"])
    if (final / "config.json").is_file():
        return final
    model = init_model(cfg, out / "vae.safetensors", seed=args.seed, vision_weights=out / "vision.safetensors")
    model.vae_local.freeze()
    # the stage-1c tower stays as it is: trained on inside SFT its features drifted and the image
    # embeddings grew 40x (measured: 19 % of shape questions right after 600 und steps, 44 % frozen)
    model.visual.freeze()
    pipe = _pipeline(model, out / "tokenizer")
    cache = TargetCache()
    tr = data["train"]
    und = _items(pipe, [Path(tr["und"])], cache, log)
    gen = _items(pipe, [Path(tr["t2i"]), Path(tr["edit"])], cache, log)
    # drawing is the hardest job: each generation / edit sample appears gen_repeat times per epoch
    items = und * args.und_repeat + gen * args.gen_repeat
    log(f"sft: {len(und)} understanding (x{args.und_repeat}) + {len(gen)} generation / edit samples "
        f"(x{args.gen_repeat})")
    task = NanoTask(pipe.processor, items, None, p_uncond=args.p_uncond, seed=args.seed, reweight=args.reweight)
    targs = trainer.TrainArgs(iters=args.iters, batch_size=args.batch_size, learning_rate=args.lr,
                              lr_schedule="cosine", warmup=args.warmup, save_every=args.save_every,
                              steps_per_eval=0, seed=args.seed)
    full = LoraConfig(fine_tune_type="full", targets=(), num_layers=-1)
    resume = trainer.CHECKPOINT_FILE in {p.name for p in sft_dir.glob("*")}
    t0 = time.perf_counter()
    if resume:
        log("sft: resuming from the last checkpoint")
    trainer.train(model, task, targs, sft_dir, full, resume=resume,
                  callback=_SmoothedLog("sft", log, weight=0.02, every=25, show_lr=True))
    write_model_dir(model, cfg, out / "tokenizer", final)
    log(f"sft: done in {_fmt_time(time.perf_counter() - t0)}")
    return final


# ---------------------------------------------------------------------------- stage 3: DPO
@dataclass
class DPOArgs:
    iters: int = 150
    batch_size: int = 2
    # measured on the shipped SFT model (100 held-out prompts): 2e-4 took drawings 7 % -> 2 % and
    # object colours 68 % -> 39 %; 1e-4 and 5e-5 left them within noise (7 % / 67 %, 8 % / 66 %)
    lr: float = 5e-5
    beta: float = 0.5
    loss: str = "ipo"  # averaged log-probs: image responses sum 3,872 bit terms (sigmoid saturates)
    rank: int = 8
    # mlx-lm's default LoRA scale 20 moved 44 matrices of this 128-wide model by up to 1.8x their
    # largest entry in 150 steps (measured on the fused weights) and broke its answers
    scale: float = 1.0
    seed: int = 0
    save_every: int = 50


def train_dpo(out: Path, data: dict, sft_model: Path, args: DPOArgs = DPOArgs(), log: Log = print) -> Path:
    """Stage 3 (resumable from ``out/dpo``): LoRA DPO on the preference pairs, fused."""
    from ..loading import load_model
    from ..training import trainer
    from ..training.data import Batchable, TargetCache, load_preference_records
    from ..training.dpo import DPOTask
    from ..training.lora import LoraConfig, apply_lora, fuse_lora
    from ..training import run

    dpo_dir, final = out / "dpo", out / "dpo_model"
    if (final / "config.json").is_file():
        return final
    model = load_model(sft_model, dtype=mx.float32)
    pipe = _pipeline(model, out / "tokenizer")
    enc = run._encoder(pipe, PN, None)
    recs = [r for k in ("dpo_img", "dpo_txt") for r in load_preference_records(Path(data["train"][k]), pipe.processor)]
    flat = [s for r in recs for s in enc.encode_pair(r)]
    cache = TargetCache()
    encode_targets_batched(model, flat, cache, log=log)
    items = [Batchable(s, cache.get(model, s.gen_image, s.schedule) if s.gen_image is not None else None)
             for s in flat]
    pairs = [(items[2 * i], items[2 * i + 1]) for i in range(len(recs))]
    model.freeze()
    lcfg = apply_lora(model, LoraConfig(rank=args.rank, scale=args.scale, targets=("llm", "infinity"), num_layers=-1),
                      seed=args.seed)
    task = DPOTask(pipe.processor, pairs, None, beta=args.beta, loss_type=args.loss, positions="inference")
    t0 = time.perf_counter()
    task.prepare_reference(model)
    log(f"dpo: reference log-probs of {len(pairs)} pairs in {time.perf_counter() - t0:.0f} s")
    targs = trainer.TrainArgs(iters=args.iters, batch_size=args.batch_size, learning_rate=args.lr,
                              save_every=args.save_every, steps_per_eval=0, seed=args.seed, beta=args.beta,
                              dpo_loss=args.loss)
    resume = (dpo_dir / trainer.CHECKPOINT_FILE).is_file()
    trainer.train(model, task, targs, dpo_dir, lcfg, resume=resume,
                  callback=_SmoothedLog("dpo", log, weight=0.1, every=10))
    fuse_lora(model)
    cfg = json.loads((sft_model / "config.json").read_text())
    write_model_dir(model, cfg, out / "tokenizer", final)
    return final


# ---------------------------------------------------------------------------- evaluation
@dataclass
class EvalArgs:
    n: int = 100  # samples per job: the shipped model on the held-out split
    n_other: int = 50  # before DPO, seen split, quantized copies
    seed: int = 0


def _meta(data: dict, split: str) -> dict:
    return json.loads(Path(data[split]["meta"]).read_text())


def evaluate_model(model_dir: Path, data: dict, split: str = "heldout", n: int = 100, seed: int = 0,
                   jobs: tuple[str, ...] = ("und", "gen", "gen_argmax", "edit"), log: Log = print) -> dict:
    """Accuracy of a model directory on ``split`` (first ``n`` records per job): understanding
    answers (greedy), generation (upstream sampling settings, and argmax), edits (upstream settings).
    Every judgement is the pixel evaluator's (``nano.evaluate``)."""
    from PIL import Image

    from .. import api
    from ..chat import ChatSession
    from . import evaluate as ev

    pipe = api.load(model_dir)
    meta = _meta(data, split)
    base = Path(data[split]["meta"]).parent
    recs = {k: json.loads(Path(data[split][k]).read_text()) for k in ("und", "t2i", "edit")}
    res: dict[str, float] = {}
    t0 = time.perf_counter()
    if "und" in jobs:
        ok = []
        for rec, m in list(zip(recs["und"], meta["und"]))[:n]:
            sess = ChatSession(pipe, max_tokens=24, temp=0.0, seed=seed, out_dir=tempfile.gettempdir())
            reply = "".join(t for t in sess.send(m["question"], images=[str(base / rec["images"][0])])
                            if isinstance(t, str))
            ok.append(ev.check_answer(m["kind"], m["expected"], reply))
        res["und"] = float(np.mean(ok))
    for job, argmax in (("gen", False), ("gen_argmax", True)):
        if job in jobs:
            ok, parts = [], []
            for i, m in enumerate(meta["t2i"][:n]):
                found = ev.analyze(api.generate_image(pipe, m["prompt"], seed=seed + i, argmax=argmax)[0])
                ok.append(ev.scene_matches(found, m["spec"]))
                if not argmax:  # which parts the drawings get right (diagnostic, beside the full check)
                    parts.append(ev.generation_parts(found, m["spec"]))
            res[job] = float(np.mean(ok))
            if parts:
                res["gen_parts"] = {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}
    if "edit" in jobs:
        ok = []
        for i, (rec, m) in enumerate(list(zip(recs["edit"], meta["edit"]))[:n]):
            img = api.edit_image(pipe, Image.open(base / rec["images"][0]), m["instruction"], seed=seed + i)[0]
            ok.append(ev.check_edit(m["before"], m["edit"], img))
        res["edit"] = float(np.mean(ok))
    log(f"eval {model_dir.name} {split}: " + " ".join(f"{k} {v:.3f}" for k, v in res.items() if k != "gen_parts")
        + f" ({time.perf_counter() - t0:.0f} s)")
    return res


# ---------------------------------------------------------------------------- the whole recipe
STAGES = ("data", "vae", "vision", "sft", "dpo", "eval", "export")


@dataclass
class RecipeArgs:
    data: DataArgs
    vae: VAEArgs
    decoder: DecoderArgs
    vision: VisionArgs
    sft: SFTArgs
    dpo: DPOArgs
    eval: EvalArgs


def full_args() -> RecipeArgs:
    return RecipeArgs(DataArgs(), VAEArgs(), DecoderArgs(), VisionArgs(), SFTArgs(), DPOArgs(), EvalArgs())


def smoke_args() -> RecipeArgs:
    """A few steps of every stage: proves the recipe runs (tests), learns nothing."""
    return RecipeArgs(DataArgs(n_und=8, n_t2i=4, n_edit=4, n_dpo_img=2, n_dpo_txt=2, n_heldout=3),
                      VAEArgs(phases=((128, 2, 2),), save_every=1), DecoderArgs(steps=2, batch=2),
                      VisionArgs(steps=2, batch=2, save_every=1),
                      SFTArgs(iters=3, batch_size=2, warmup=1, save_every=2),
                      DPOArgs(iters=2, batch_size=1, save_every=1), EvalArgs(n=2, n_other=1))


def quantized_copy(src: Path, bits: int, group_size: int = 32) -> Path:
    from vargpt_mlx.convert.convert import QuantSpec, quantize_checkpoint

    dst = src.with_name(f"{src.name}-q{bits}")
    if not (dst / "config.json").is_file():
        quantize_checkpoint(src, dst, quant=QuantSpec(bits=bits, group_size=group_size, scope="all"), force=True)
    return dst


def eval_table(out: Path, data: dict, sft: Path, dpo: Path, args: EvalArgs, log: Log = print) -> dict:
    """Figures for the model card: VAE PSNR; per model (before / after DPO; fp, q8, q4) and
    split (seen = train records, held-out) the job accuracies. Cached in ``out/eval.json``."""
    f = out / "eval.json"
    table = json.loads(f.read_text()) if f.is_file() else {}
    if "vae_psnr_heldout" not in table or "vae_ceiling" not in table:
        vae = BSQVAE(vae_config())
        final = out / "vae_decoder.safetensors"
        vae.load_weights(str(final if final.is_file() else out / "vae.safetensors"))
        table["vae_psnr_heldout"] = eval_vae(vae, n=max(args.n, 16), split="heldout")
        table["vae_psnr_seen"] = eval_vae(vae, n=max(args.n, 16), seed=1000, split="train")
        table["vae_ceiling"] = eval_vae_scenes(vae, n=max(args.n_other, 16))

    def run(name, path, split):
        key = f"{name}/{split}"
        if key not in table:
            n = args.n if split == "heldout" and name in ("sft", "dpo") else args.n_other
            table[key] = evaluate_model(path, data, split, n=n, seed=args.seed, log=log)
            table[key]["n"] = n
            atomic_write_text(f, json.dumps(table, indent=1))
        return table[key]

    before, after = run("sft", sft, "heldout"), run("dpo", dpo, "heldout")
    # DPO must not lower any figure: otherwise the model before DPO is the one that ships
    name, final = ("dpo", dpo) if all(after[k] >= before[k] for k in ("und", "gen", "gen_argmax", "edit")) \
        else ("sft", sft)
    table["shipped"] = name
    run(name, final, "train")
    run(f"{name}-q8", quantized_copy(final, 8), "heldout")
    run(f"{name}-q4", quantized_copy(final, 4), "heldout")
    atomic_write_text(f, json.dumps(table, indent=1))
    return table


def format_table(table: dict) -> str:
    cols = ("und", "gen", "gen_argmax", "edit")
    lines = ["| model | split | understanding | generation (upstream sampling) | generation (argmax) | editing | n |",
             "|---|---|---|---|---|---|---|"]
    for key, row in table.items():
        if "/" in key and isinstance(row, dict):
            name, split = key.split("/")
            lines.append(f"| {name} | {'held-out' if split == 'heldout' else 'seen'} | "
                         + " | ".join(f"{100 * row[c]:.0f} %" if c in row else "-" for c in cols)
                         + f" | {row.get('n', '')} |")
    parts = [(k, r["gen_parts"]) for k, r in table.items() if isinstance(r, dict) and "gen_parts" in r]
    if parts:
        lines += ["\nDrawings part by part (upstream sampling; each part judged alone):", "",
                  "| model | split | background | object count | object colours | object shapes |", "|---|---|---|---|---|---|"]
        for key, p in parts:
            name, split = key.split("/")
            lines.append(f"| {name} | {'held-out' if split == 'heldout' else 'seen'} | "
                         + " | ".join(f"{100 * p[c]:.0f} %" for c in ("background", "count", "colours", "shapes")) + " |")
    lines.append(f"\nShipped: the model {'after' if table.get('shipped') == 'dpo' else 'before'} DPO "
                 "(DPO ships only if it lowers no held-out figure).")
    lines.append(f"\nVAE reconstruction PSNR: {table.get('vae_psnr_heldout', float('nan')):.2f} dB held-out, "
                 f"{table.get('vae_psnr_seen', float('nan')):.2f} dB seen.")
    if "vae_ceiling" in table:
        c = table["vae_ceiling"]
        lines.append(f"\nThe VAE's ceiling: the evaluator reads {100 * c['all']:.0f} % of {c['n']} held-out ground-truth "
                     f"scenes right after encode -> bits -> decode (background {100 * c['background']:.0f} %, count "
                     f"{100 * c['count']:.0f} %, colours {100 * c['colours']:.0f} %, shapes {100 * c['shapes']:.0f} %).")
    return "\n".join(lines)


def export(model_dir: Path, dest: Path, info: dict) -> Path:
    """Copy the final model to ``dest`` (the package's ``nano/model`` when shipping) with a
    ``nano.json`` card (recipe settings, timings, figures)."""
    import shutil

    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("vae_refined"))  # the recipe's own marker
    (tmp / "nano.json").write_text(json.dumps(info, indent=1))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def run_recipe(out: str | Path, *, args: RecipeArgs | None = None, ship_to: str | Path | None = None,
               log: Log = print, stop_after: str | None = None) -> dict:
    """Every stage in order, each skipped when its output exists (so a killed run resumes).
    Returns the info dict written to ``nano.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = args or full_args()
    times_f = out / "times.json"
    times = json.loads(times_f.read_text()) if times_f.is_file() else {}

    def timed(stage, fn):
        t0 = time.perf_counter()
        r = fn()
        if stage not in times:
            times[stage] = time.perf_counter() - t0
            atomic_write_text(times_f, json.dumps(times, indent=1))
        return r

    data = timed("data", lambda: make_data(out, args.data, log))
    if stop_after == "data":
        return {}
    timed("vae", lambda: train_vae(out, args.vae, log))
    if stop_after == "vae":
        return {}
    cfg = model_config(data["special_ids"], data["vocab_size"])
    timed("vision", lambda: train_vision(out, cfg, args.vision, log))
    if stop_after == "vision":
        return {}
    # stage 1b (decoder refinement), then stage 2, one after the other: each uses both cores now (two
    # CPU streams, a two-thread BLAS), and side by side they slowed each other down ~3x (measured:
    # SFT 1.05 s per step beside the decoder stage, 0.33 s alone)
    timed("vae_decoder", lambda: train_decoder(out, args.decoder, log))
    sft = timed("sft", lambda: train_sft(out, data, args.sft, log))
    if stop_after == "sft":
        return {}
    dpo = timed("dpo", lambda: train_dpo(out, data, sft, args.dpo, log))
    if stop_after == "dpo":
        return {}
    for d in (sft, dpo):  # the refined decoder (encoder, hence every bit, unchanged)
        marker = d / "vae_refined"
        if not marker.exists():
            swap_vae(d, out / "vae_decoder.safetensors")
            marker.write_text("vae_local from vae_decoder.safetensors\n")
    table = timed("eval", lambda: eval_table(out, data, sft, dpo, args.eval, log))
    log("\n" + format_table(table))
    train_time = sum(v for k, v in times.items() if k in ("data", "vae", "vision", "vae_decoder", "sft", "dpo"))
    info = {"recipe": {k: asdict(v) for k, v in asdict_shallow(args).items()}, "seconds": times,
            "training_seconds": train_time, "eval": table,
            "architecture": {"llm": LLM, "vision": VISION, "infinity": INFINITY, "vae": VAE, "pn": PN}}
    log(f"training time (data + vae + sft + dpo): {_fmt_time(train_time)}")
    if ship_to is not None:
        export(dpo if table["shipped"] == "dpo" else sft, Path(ship_to), info)
        log(f"shipped to {ship_to}")
    return info


def asdict_shallow(args: RecipeArgs) -> dict:
    return {"data": args.data, "vae": args.vae, "decoder": args.decoder, "vision": args.vision, "sft": args.sft,
            "dpo": args.dpo,
            "eval": args.eval}
