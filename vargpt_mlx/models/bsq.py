"""Multi-scale binary spherical quantiser (BSQ) of the Infinity BSQ-VAE, channels-last.

Mirrors upstream ``infinity/models/bsq_vae/multiscale_bsq.py`` (``MultiScaleBSQ``, ``BSQ``) and
``infinity/utils/bitwise_self_correction.py`` (``BitwiseSelfCorrection.flip_requant``), plus the
per-scale code accumulation of VARGPT's ``autoregressive_infer_cfg``.

Layout: latents / codes are ``(B, h, w, d)`` with ``d`` = codebook_dim (32) bits per position.
Upstream works on ``(B, d, 1, h, w)``; its time axis is always 1, so the ``trilinear`` / ``area``
interpolations reduce to 2-D ones. They are implemented here as precomputed (static numpy)
interpolation matrices applied with ``einsum``: exact index/weight choices of PyTorch, any sizes.

A scale schedule is a list of ``(h, w)`` grids (upstream's ``(t, h, w)`` with ``t`` dropped); its
last entry is the full latent grid.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import mlx.core as mx
import numpy as np

Schedule = list[tuple[int, int]]


# --------------------------------------------------------------------------- interpolation
@lru_cache(maxsize=None)
def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of ``F.interpolate(mode='linear'|'trilinear', align_corners=False)``.

    Mirrors ATen ``area_pixel_compute_source_index`` + ``guard_index_and_lambda`` in float32:
    ``src = max((i + 0.5) * (n_in / n_out) - 0.5, 0)``, ``i0 = floor(src)``, ``i1 = min(i0 + 1, n_in - 1)``,
    weights ``(1 - lam, lam)``. No antialiasing, also when downsampling.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    for i in range(n_out):
        src = max(scale * np.float32(i + 0.5) - np.float32(0.5), np.float32(0.0))
        i0 = min(int(np.floor(src)), n_in - 1)
        lam = np.float32(min(max(src - np.float32(i0), 0.0), 1.0))
        i1 = min(i0 + 1, n_in - 1)
        m[i, i0] += np.float32(1.0) - lam
        m[i, i1] += lam
    return m


@lru_cache(maxsize=None)
def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of ``F.interpolate(mode='area')`` = adaptive average pooling.

    Window i covers ``[floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out))``.
    """
    m = np.zeros((n_out, n_in), dtype=np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _apply_separable(x: mx.array, mh: np.ndarray, mw: np.ndarray) -> mx.array:
    """Apply per-axis interpolation matrices to ``(B, h, w, d)``: width first, then height.

    The width-then-height order matches ATen's nesting ``h0*(w0*x00 + w1*x01) + h1*(...)``. One
    image at a time: the product's shape then does not depend on the batch, so an image comes out
    bit-identical whatever batch it is drawn in (OpenBLAS picks its kernel by shape, and its
    roundings differed between a batch of 2 and of 1).
    """
    mw, mh = mx.array(mw), mx.array(mh)
    out = [mx.einsum("Hh,hWd->HWd", mh, mx.einsum("Ww,hwd->hWd", mw, xi)) for xi in x]
    return mx.stack(out)


def upsample_trilinear(x: mx.array, size: tuple[int, int]) -> mx.array:
    """``F.interpolate(x, size=(1, H, W), mode='trilinear', align_corners=False)`` on ``(B, h, w, d)``.

    The time axis is trivial, so this is bilinear with half-pixel centres and no antialias; it also
    serves for *down*-sizing (upstream uses trilinear for the teacher / next-scale inputs).
    """
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(size):
        return x
    return _apply_separable(x, _linear_matrix(h, size[0]), _linear_matrix(w, size[1]))


def downsample_area(x: mx.array, size: tuple[int, int]) -> mx.array:
    """``F.interpolate(x, size=(1, h, w), mode='area')`` (adaptive average pooling) on ``(B, H, W, d)``."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(size):
        return x
    return _apply_separable(x, _area_matrix(h, size[0]), _area_matrix(w, size[1]))


# --------------------------------------------------------------------------- BSQ
def l2_normalize(x: mx.array, eps: float = 1e-12) -> mx.array:
    """``F.normalize(x, dim=-1, eps)``: ``x / max(||x||, eps)`` (upstream ``l2norm``; also the
    Infinity attention's q / k normalisation)."""
    return x / mx.maximum(mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True)), eps)


def bits_to_codes(bits: mx.array) -> mx.array:
    """Upstream ``BSQ.indices_to_codes(bits, 'bit_label')``: ``l2norm(bits * 2s - s)``, s = 1/sqrt(d)."""
    d = bits.shape[-1]
    s = float(np.float32(1.0 / np.sqrt(d)))
    return l2_normalize(bits.astype(mx.float32) * s * 2 - s)


def quantize_bits(residual: mx.array) -> mx.array:
    """Upstream ``BSQ.forward`` bit labels: ``bit = l2norm(residual) > 0`` (a zero gives bit 0), uint8."""
    return (l2_normalize(residual) > 0).astype(mx.uint8)


def _check_schedule(features: mx.array, schedule: Schedule) -> None:
    if tuple(schedule[-1]) != tuple(features.shape[1:3]):
        raise ValueError(
            f"last scale {tuple(schedule[-1])} must equal the latent grid {tuple(features.shape[1:3])}"
        )


def encode_multiscale(features: mx.array, schedule: Schedule,
                      flip: Callable[[mx.array], mx.array] | None = None) -> tuple[list[mx.array], mx.array, mx.array]:
    """Ground-truth bits and teacher-forcing inputs from raw VAE features.

    Mirrors ``BitwiseSelfCorrection.flip_requant`` with ``noise_apply_strength=0``:
    ``r_k = area(f - cum -> (h, w))`` (the last scale is not resized), ``bits_k = BSQ(r_k)``,
    ``cum += trilinear(bits_to_codes(bits_k) -> full)``, teacher input of scale k+1 =
    ``trilinear(cum -> scale k+1)`` flattened row-major.

    ``flip``: bitwise self-correction (upstream ``noise_apply_strength > 0``): the codes of
    ``flip(bits_k)`` are accumulated while the unflipped bits stay the labels.

    Returns ``(bits per scale (B, h, w, d) uint8, x_BLC_wo_prefix (B, L - h0*w0, d), summed codes)``.
    """
    _check_schedule(features, schedule)
    full = tuple(schedule[-1])
    last = len(schedule) - 1
    cum = mx.zeros_like(features)
    all_bits, teacher = [], []
    for si, size in enumerate(schedule):
        residual = features - cum
        if si != last:
            residual = downsample_area(residual, size)
        bits = quantize_bits(residual)
        all_bits.append(bits)
        cum = cum + upsample_trilinear(bits_to_codes(bits if flip is None else flip(bits)), full)
        if si != last:
            teacher.append(next_scale_input(cum, schedule[si + 1]))
    x_blc = mx.concatenate(teacher, axis=1) if teacher else mx.zeros((features.shape[0], 0, features.shape[-1]))
    return all_bits, x_blc, cum


def add_scale_codes(summed: mx.array | None, bits: mx.array, k: int, schedule: Schedule) -> mx.array:
    """``summed`` plus the codes of scale k's bits, trilinear to the full grid but at the last
    scale (upstream ``get_next_autoregressive_input``'s ``f_hat``); ``None`` starts a sum."""
    codes = bits_to_codes(bits)
    if k != len(schedule) - 1:
        codes = upsample_trilinear(codes, tuple(schedule[-1]))
    return codes if summed is None else summed + codes


def codes_from_bits(bits_per_scale: list[mx.array], schedule: Schedule) -> mx.array:
    """Summed codes of the inference loop (``autoregressive_infer_cfg``) -> (B, H, W, d)."""
    summed = None
    for k, bits in enumerate(bits_per_scale):
        summed = add_scale_codes(summed, bits, k, schedule)
    return summed


def next_scale_input(summed: mx.array, size: tuple[int, int]) -> mx.array:
    """Word-embedding input of the next scale: ``trilinear(summed -> (h, w))`` as ``(B, h*w, d)``."""
    x = upsample_trilinear(summed, size)
    return x.reshape(x.shape[0], size[0] * size[1], x.shape[-1])


def msbsq_forward(features: mx.array, schedule: Schedule) -> tuple[mx.array, list[mx.array]]:
    """Upstream ``MultiScaleBSQ.forward`` (the ``vae.encode()`` path, unused by VARGPT).

    Residual quantisation with the straight-through values ``z + sg(±s - z)`` (z = l2norm of the
    area-downsampled residual) instead of codes re-derived from bits; sizes equal to the full grid
    are not interpolated. Returns ``(quantized sum (B, H, W, d), bits per scale)``.
    """
    full = tuple(features.shape[1:3])
    d = features.shape[-1]
    s = float(np.float32(1.0 / np.sqrt(d)))
    residual, out = features, mx.zeros_like(features)
    all_bits = []
    for size in schedule:
        z = l2_normalize(downsample_area(residual, size))
        zhat = mx.where(z > 0, s, -s)
        quantized = z + mx.stop_gradient(zhat - z)
        all_bits.append((quantized > 0).astype(mx.uint8))
        quantized = upsample_trilinear(quantized, full)
        residual = residual - quantized
        out = out + quantized
    return out, all_bits
