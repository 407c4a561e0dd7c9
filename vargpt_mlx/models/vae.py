"""BSQ-VAE encoder / decoder (``vae_local.*``), channels-last.

Mirrors upstream ``infinity/models/bsq_vae/flux_vqgan.py`` (``AutoEncoder`` with ``Encoder``,
``Decoder``, ``ResnetBlock``, ``Downsample``, ``Upsample``, ``Normalize``) in its image
configuration: ``cnn_type='2d'``, no attention, ``use_vae=False``, GroupNorm everywhere. The
quantiser has no parameters (see :mod:`vargpt_mlx.models.bsq`).

Parameter names equal upstream's state-dict names with the ``vae_local.`` prefix stripped, e.g.
``encoder.down.0.block.0.conv1.conv.weight`` or ``decoder.up.4.upsample.conv.conv.weight``.
Images are ``(B, H, W, 3)`` in [-1, 1]; latents ``(B, H/16, W/16, codebook_dim)``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vargpt_mlx.config import VAEConfig

# Upstream keys (prefix stripped) that the port knowingly drops: the BSQ ``mask`` int64 buffer
# (``2**arange(31..0)``) is only used for integer labels; VARGPT uses bit labels.
DROPPED = ("quantizer.lfq.mask",)


def _num_groups(channels: int) -> int:
    """Upstream ``Normalize`` group rule: 32 groups if C % 32 == 0, else 24 if C % 24 == 0."""
    if channels % 32 == 0:
        return 32
    if channels % 24 == 0:
        return 24
    raise ValueError(f"VAE GroupNorm needs a channel count divisible by 32 or 24, got {channels}")


class Conv(nn.Module):
    """Upstream ``conv.Conv`` wrapper around a 2-D convolution (keys ``*.conv.weight``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(x)


def _blocked_sum(x: mx.array, axis: int) -> mx.array:
    """Sum over ``axis`` in levels of at most 64 terms (pairwise-like float32 accuracy).

    A plain float32 sum over n terms accumulates an error that grows with n; MLX's CPU reductions
    (and ``mx.fast.layer_norm``) add the terms in sequence, so a GroupNorm over the 262,144 values
    of one group at 512x512 lands ~2e-4 away from the exact statistics (torch reduces in a tree).
    Summing blocks of 64, then the block sums, keeps it near one float32 rounding per level.
    """
    n = x.shape[axis]
    while n > 64:
        k = 64
        while n % k:
            k //= 2
        if k == 1:
            break
        shape = list(x.shape)
        shape[axis:axis + 1] = [n // k, k]
        x = x.reshape(shape).sum(axis=axis + 1)
        n //= k
    return x.sum(axis=axis, keepdims=True)


class Normalize(nn.Module):
    """Upstream ``Normalize``: ``GroupNorm(groups, C, eps=1e-6, affine=True)`` (keys ``*.norm.weight``).

    The statistics are two-pass (mean, then the mean of squared deviations) with blocked float32
    sums (``_blocked_sum``), whatever the input dtype; see ``_blocked_sum`` for why not
    ``nn.GroupNorm`` / ``mx.fast.layer_norm``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_num_groups(channels), channels, eps=1e-6, affine=True,
                                 pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        *lead, C = x.shape
        B, G = x.shape[0], self.norm.num_groups
        xf = x.astype(mx.float32).reshape(B, -1, G, C // G)  # (B, positions, groups, channels/group)
        n = xf.shape[1] * xf.shape[3]
        mean = _blocked_sum(xf.sum(axis=3, keepdims=True), axis=1) / n
        xc = xf - mean
        var = _blocked_sum((xc * xc).sum(axis=3, keepdims=True), axis=1) / n
        y = (xc * mx.rsqrt(var + self.norm.eps)).reshape(*lead, C)
        return (y * self.norm.weight + self.norm.bias).astype(x.dtype)


class ResnetBlock(nn.Module):
    """Upstream ``ResnetBlock``: ``x' + conv2(swish(norm2(conv1(swish(norm1(x))))))`` where x' is
    ``nin_shortcut(x)`` (1x1 conv) when the channel count changes, else x."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = Normalize(cin)
        self.conv1 = Conv(cin, cout, 3, padding=1)
        self.norm2 = Normalize(cout)
        self.conv2 = Conv(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = Conv(cin, cout, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "nin_shortcut" in self:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Upstream ``Downsample`` (2d): zero-pad right/bottom by 1, then conv3x3 stride 2, pad 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    """Upstream ``Upsample`` (2d, no pixel shuffle): nearest x2, then conv3x3 pad 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class Level(nn.Module):
    """One resolution level (upstream ``down[i]`` / ``up[i]``): ResnetBlocks, then the optional
    ``downsample`` / ``upsample`` submodule that the encoder / decoder attaches."""

    def __init__(self, cin: int, cout: int, n_blocks: int):
        super().__init__()
        self.block = [ResnetBlock(cin if i == 0 else cout, cout) for i in range(n_blocks)]

    def __call__(self, x: mx.array) -> mx.array:
        for blk in self.block:
            x = blk(x)
        for name in ("downsample", "upsample"):
            if name in self:
                x = self[name](x)
        return x


class Mid(nn.Module):
    """Upstream ``mid`` (``cnn_attention='no'``): ``block_1`` then ``block_2``."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.block_2 = ResnetBlock(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """Upstream ``Encoder``: conv_in, per level ``num_res_blocks`` ResnetBlocks (+ Downsample on the
    first log2(patch_size) levels), mid, GroupNorm -> swish -> conv_out to codebook_dim."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.encoder_ch_mult
        n_down = int(math.log2(cfg.patch_size))
        self.conv_in = Conv(cfg.in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(mult)
        self.down = [Level(ch * in_mult[i], ch * mult[i], cfg.num_res_blocks) for i in range(len(mult))]
        for i in range(min(n_down, len(mult))):
            self.down[i].downsample = Downsample(ch * mult[i])
        block_in = ch * mult[-1]
        self.mid = Mid(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, cfg.codebook_dim, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(nn.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Upstream ``Decoder``: conv_in, mid, levels from lowest (``up[n-1]``) to full resolution
    (``up[0]``) with ``num_res_blocks + 1`` ResnetBlocks each (+ Upsample on levels
    1..log2(patch_size)), GroupNorm -> swish -> conv_out to RGB."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.decoder_ch_mult
        n_up = int(math.log2(cfg.patch_size))
        block_in = ch * mult[-1]
        self.conv_in = Conv(cfg.codebook_dim, block_in, 3, padding=1)
        self.mid = Mid(block_in)
        # up[i] is level i; its input width is the output width of level i+1 (or the mid width).
        ins = [ch * m for m in mult[1:]] + [block_in]
        self.up = [Level(ins[i], ch * mult[i], cfg.num_res_blocks + 1) for i in range(len(mult))]
        for i in range(1, min(n_up, len(mult) - 1) + 1):
            self.up[i].upsample = Upsample(ch * mult[i])
        self.norm_out = Normalize(ch * mult[0])
        self.conv_out = Conv(ch * mult[0], cfg.in_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(nn.silu(self.norm_out(h)))


class BSQVAE(nn.Module):
    """Upstream ``AutoEncoder`` (``vae_local``) minus its parameter-free quantiser."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode_features(self, x: mx.array) -> mx.array:
        """Upstream ``encode_for_raw_features``: (B, H, W, 3) in [-1, 1] -> (B, H/16, W/16, d)."""
        return self.encoder(x)

    def decode(self, z: mx.array) -> mx.array:
        """Upstream ``decode``: (B, h, w, d) codes -> (B, 16h, 16w, 3) clamped to [-1, 1]."""
        return mx.clip(self.decoder(z), -1.0, 1.0)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Upstream ``vae_local.*`` weights (prefix stripped, PyTorch layout) -> :class:`BSQVAE` names.

    Conv weights go from OIHW to MLX OHWI; the keys in :data:`DROPPED` are removed; anything else
    is passed through unchanged (so a strict load reports unknown keys).
    """
    out = {}
    for k, v in weights.items():
        if k in DROPPED:
            continue
        out[k] = v.transpose(0, 2, 3, 1) if k.endswith("conv.weight") and v.ndim == 4 else v
    return out


def to_uint8(decoded) -> np.ndarray:
    """Upstream image conversion: ``((x + 1) / 2) * 255`` in float32, then uint8 *truncation*.

    ``decoded`` is (B, H, W, 3) RGB in [-1, 1]; returns (B, H, W, 3) RGB uint8 (upstream then
    flips to BGR only for ``cv2.imwrite``).
    """
    if isinstance(decoded, mx.array):
        decoded = decoded.astype(mx.float32)  # numpy has no bfloat16
    x = np.asarray(decoded, dtype=np.float32)
    return (((x + np.float32(1)) / np.float32(2)) * np.float32(255)).astype(np.uint8)
