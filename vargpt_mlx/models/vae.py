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
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vargpt_mlx.config import VAEConfig
from vargpt_mlx.models import activations

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
    """Upstream ``conv.Conv`` wrapper around a 2-D convolution (keys ``*.conv.weight``).

    On the CPU backend the 3x3 stride-1 pad-1 convolutions (all but the encoder's downsampling ones)
    run as ``_conv3x3_rows``, the 1x1 ones as one matmul: MLX's CPU convolution spends most of its
    time copying im2col patches, ~3x longer than the BLAS matmuls themselves.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        c = self.conv
        w = c.weight
        if (mx.default_device() == mx.cpu and x.dtype == mx.float32 and _pair(c.stride) == (1, 1)
                and _pair(c.dilation) == (1, 1) and getattr(c, "groups", 1) == 1):
            if w.shape[1:3] == (3, 3) and _pair(c.padding) == (1, 1):
                return _conv3x3_rows(x, w, c.bias)
            if w.shape[1:3] == (1, 1) and _pair(c.padding) == (0, 0):
                *lead, cin = x.shape
                return mx.addmm(c.bias, x.reshape(-1, cin), w.reshape(w.shape[0], cin).T).reshape(*lead, -1)
        return c(x)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@mx.custom_function
def _conv3x3_rows(x: mx.array, w: mx.array, b: mx.array) -> mx.array:
    """3x3 convolution, stride 1, zero padding 1, as nine BLAS matmuls on contiguous row ranges.

    The padded image (B, H+3, W+2, C) is read as one matrix of rows (pixels); the input of output
    pixel q for kernel tap (i, j) is row ``q + i (W+2) + j``, so each tap is one matmul of a
    contiguous row range with the (C, O) tap weights, accumulated by ``addmm`` (bias first, taps in
    row-major order). Rows that fall on the padding columns are computed and dropped.
    """
    taps = [((i, j), w[:, i, j, :].T) for i in range(3) for j in range(3)]
    return _taps_rows(_pad_rows(x), x.shape, taps, b)


@_conv3x3_rows.vjp
def _conv3x3_rows_vjp(primals, cotangent, output):
    # Autodiff through the nine row slices builds nine zero-filled copies of the padded input per
    # convolution (measured: a VAE training step spent 8x its forward time in backward). Written
    # out, the input gradient is the same convolution of the cotangent with the flipped, transposed
    # taps, and each tap's weight gradient is one matmul over the same row ranges.
    x, w, b = primals
    return _conv3x3_input_grad(cotangent, w, x.shape), _conv3x3_weight_grad(x, cotangent), \
        cotangent.reshape(-1, cotangent.shape[-1]).sum(0)


def _conv3x3_input_grad(g: mx.array, w: mx.array, shape: tuple) -> mx.array:
    """d/dx of a 3x3 pad-1 convolution: the cotangent convolved with the flipped taps, (O, C) each."""
    taps = [((i, j), w[:, 2 - i, 2 - j, :]) for i in range(3) for j in range(3)]
    return _taps_rows(_pad_rows(g), g.shape, taps, mx.zeros((shape[-1],), g.dtype))


def _conv3x3_weight_grad(x: mx.array, g: mx.array) -> mx.array:
    """d/dw (O, 3, 3, C) of a 3x3 pad-1 convolution of ``x`` with output cotangent ``g``."""
    B, H, W, C = x.shape
    O = g.shape[-1]
    Wp, P = W + 2, (H + 3) * (W + 2)
    n = (B - 1) * P + H * Wp
    rows = _pad_rows(x)
    # the cotangent laid out on the padded row grid of _taps_rows (zeros on its dropped rows)
    gr = mx.pad(g, [(0, 0), (0, 3), (0, 2), (0, 0)]).reshape(-1, O)[:n]
    grads = [rows[i * Wp + j:i * Wp + j + n].T @ gr for i in range(3) for j in range(3)]  # (C, O) each
    return mx.stack(grads, 0).reshape(3, 3, C, O).transpose(3, 0, 1, 2)


def _pad_rows(x: mx.array) -> mx.array:
    """``x`` (B, H, W, C) zero-padded to (B, H+3, W+2, C) and read as rows (B*(H+3)*(W+2), C)."""
    return mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)]).reshape(-1, x.shape[-1])


def _taps_rows(rows: mx.array, shape: tuple, taps: list, b: mx.array) -> mx.array:
    """``b + sum over taps ((i, j), w) of x_padded[h + i, w + j] @ w`` for every output pixel
    (h, w) of an input of ``shape`` (B, H, W, C) padded by ``_pad_rows``; ``w`` is (C, O)."""
    B, H, W, _ = shape
    O = taps[0][1].shape[1]
    Wp = W + 2
    P = (H + 3) * Wp  # rows per image (one extra zero row below keeps the last taps in range)
    n = (B - 1) * P + H * Wp
    acc = None
    for (i, j), tap in taps:
        off = i * Wp + j
        acc = mx.addmm(b if acc is None else acc, rows[off:off + n], tap)
    if B > 1:
        acc = mx.pad(acc, [(0, B * P - n), (0, 0)])
        return acc.reshape(B, H + 3, Wp, O)[:, :H, :W, :]
    return acc.reshape(1, H, Wp, O)[:, :, :W, :]


def _upsample_conv3x3(x: mx.array, w: mx.array, b: mx.array) -> mx.array:
    """Nearest x2 upsampling followed by a 3x3 conv (pad 1), computed on the low-resolution input.

    Output row 2h + a reads upsampled rows 2h+a-1 .. 2h+a+1, i.e. input rows h-1, h, h (a = 0) or
    h, h, h+1 (a = 1); likewise for columns. So each of the four output phases (a, b) is a 2x2
    convolution of the input whose taps are sums of the 3x3 taps that read the same input pixel:
    4 taps per output pixel instead of 9 (2.25x fewer FLOPs); the phases are then interleaved.
    """
    B, H, W, C = x.shape
    O = w.shape[0]
    groups = (((0, (0,)), (1, (1, 2))), ((1, (0, 1)), (2, (2,))))  # phase -> (padded offset, 3x3 taps)
    rows = _pad_rows(x)
    can_eval = activations.can_eval(rows)
    out_rows = []
    for a in range(2):
        phases = []
        for c in range(2):
            taps = []
            for i, ki in groups[a]:
                for j, kj in groups[c]:
                    tw = sum(w[:, p, q, :] for p in ki for q in kj)
                    taps.append(((i, j), tw.T))
            phases.append(_taps_rows(rows, x.shape, taps, b))
        # interleaved by stacking, so that every reshape is free: (B, H, W, 2, O) is output row
        # phase a's columns 2w + c, and (B, H, 2, 2W, O) below its rows 2h + a. Evaluated phase row
        # by phase row where allowed (measured at 256x256 x 256 channels -> 512x512: the four phases,
        # their stack and its transposed copy were 0.82 GiB in flight).
        out_rows.append(mx.stack(phases, axis=3).reshape(B, H, 2 * W, O))
        if can_eval:
            mx.eval(out_rows[-1])
    return mx.stack(out_rows, axis=2).reshape(B, 2 * H, 2 * W, O)


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

    def __call__(self, x: mx.array, silu: bool = False) -> mx.array:
        """GroupNorm of ``x``; with ``silu`` also the swish that follows every VAE norm (fused)."""
        *lead, C = x.shape
        B, G = x.shape[0], self.norm.num_groups
        # Statistics per channel over the positions (a reduction across rows, contiguous along C),
        # then per group over its C/G channels: a (positions, groups, C/G) layout with 1-4 channels
        # innermost made every elementwise op and reduction a short strided loop (measured at
        # 512x512 x 64 channels: the centring alone 36 ms against 3 ms per value-equal pass).
        xf = x.astype(mx.float32).reshape(B, -1, C)
        n = xf.shape[1] * (C // G)

        def per_group(t):  # (B, 1, C) channel sums -> (B, 1, C): its group's sum on every channel
            g = t.reshape(B, 1, G, C // G).sum(axis=3, keepdims=True)
            return mx.broadcast_to(g, (B, 1, G, C // G)).reshape(B, 1, C)

        mean = per_group(_blocked_sum(xf, axis=1)) / n
        w, b = self.norm.weight, self.norm.bias
        fused = silu and x.dtype == mx.float32 and mx.default_device() == mx.cpu
        if fused and (runs := _runs(xf)) is not None:
            var = per_group(_blocked_sum(_centred_squares_level1(xf, mean, runs), axis=1)) / n
            return _norm_silu_runs(xf, mean, mx.rsqrt(var + self.norm.eps), w, b, runs).reshape(*lead, C)
        xc = xf - mean
        var = per_group(_blocked_sum(xc * xc, axis=1)) / n
        inv = mx.rsqrt(var + self.norm.eps)
        if fused:
            return _affine_silu(xc, inv, w, b).reshape(*lead, C)
        y = (xc * inv).reshape(*lead, C)
        y = (y * w + b).astype(x.dtype)
        return activations.silu(y) if silu else y


@mx.compile
def _affine_silu(xc: mx.array, inv: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """``silu((xc * inv) * weight + bias)`` in one pass (the same operations as the unfused path)."""
    return activations.silu((xc * inv) * weight + bias)


# Large activations (a full-size decoder's are 128-256 MiB at 512x512) are normalised in runs of
# about _CHUNK_ELEMENTS values: the unfused path holds the centred copy, its square and, since MLX
# fuses at most 11 operations deep, the polynomial SiLU's full-size intermediates (measured at
# 512x512 x 128 channels: 1.0 GiB over a 128 MiB input; chaining the runs with ``mx.depends`` did not
# bound it, 0.83 GiB). Each run is evaluated before the next starts where evaluation is allowed
# (not inside ``mx.compile`` / ``mx.vmap``), one run on each of two CPU streams at a time (MLX runs
# elementwise kernels on one thread per stream). Every value takes the same operations as in the
# unfused path, so the result is bit-identical (tests/test_vae.py).
_CHUNK_ELEMENTS = 1 << 22
_BLOCK = 64  # _blocked_sum's first level


def _runs(xf: mx.array) -> list[slice] | None:
    """Runs of positions of ``xf (B, positions, C)``, whole first-level blocks of ``_blocked_sum``
    each; ``None`` when one run would do or the positions are not whole blocks."""
    B, n, C = xf.shape
    rows = max(1, _CHUNK_ELEMENTS // (B * C)) // _BLOCK * _BLOCK
    if n % _BLOCK or rows == 0 or n <= rows:
        return None
    return [slice(s, s + rows) for s in range(0, n, rows)]


def _in_runs(fn: Callable[[slice], mx.array], runs: list[slice], axis: int, inputs: list[mx.array]) -> mx.array:
    """``concatenate([fn(run) for run in runs], axis)``, at most one run in flight per CPU stream
    where ``inputs`` can be evaluated."""
    streams = activations.cpu_streams()
    can_eval = activations.can_eval(*inputs)
    outs: list[mx.array] = []
    for i, run in enumerate(runs):
        with mx.stream(streams[i % len(streams)]):
            outs.append(fn(run))
        if can_eval and i % len(streams) == len(streams) - 1:
            mx.eval(outs[-len(streams):])
    return mx.concatenate(outs, axis=axis)


def _centred_squares_level1(xf: mx.array, mean: mx.array, runs: list[slice]) -> mx.array:
    """``_blocked_sum``'s first level of ``(xf - mean)**2`` (blocks of 64 positions), run by run:
    the same blocks summed the same way, so the statistics are those of the unfused path."""
    B, _, C = xf.shape

    def level1(run):
        xc = xf[:, run] - mean
        return (xc * xc).reshape(B, -1, _BLOCK, C).sum(axis=2)

    return _in_runs(level1, runs, 1, [xf, mean])


def _norm_silu_runs(xf: mx.array, mean: mx.array, inv: mx.array, weight: mx.array, bias: mx.array,
                    runs: list[slice]) -> mx.array:
    """``silu(((xf - mean) * inv) * weight + bias)`` run by run."""
    return _in_runs(lambda run: _affine_silu(xf[:, run] - mean, inv, weight, bias), runs, 1, [xf, mean, inv])


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
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        if "nin_shortcut" in self:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Upstream ``Downsample`` (2d): zero-pad right/bottom by 1, then conv3x3 stride 2, pad 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        c = self.conv.conv
        if x.dtype == mx.float32 and mx.default_device() == mx.cpu and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
            return _downsample_conv(x, c.weight, c.bias)
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


@mx.custom_function
def _downsample_conv(x: mx.array, w: mx.array, b: mx.array) -> mx.array:
    """``Downsample``'s pad + stride-2 3x3 convolution (MLX's own forward, unchanged)."""
    return mx.conv2d(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]), w, stride=2) + b


@_downsample_conv.vjp
def _downsample_conv_vjp(primals, cotangent, output):
    # MLX's strided-convolution backward takes ~50x its forward on the CPU (measured: 519 ms vs
    # 10.5 ms at 4x128x128x48), most of a VAE encoder's training step. Written out: padded pixel
    # (2h + i, 2w + j) feeds output (h, w) through tap (i, j); the weight gradient is one matmul
    # of the tap-gathered input with the cotangent, the input gradient the cotangent through the
    # taps scattered back onto the four row/column parity phases.
    x, w, b = primals
    g = cotangent
    B, H, W, C = x.shape
    O, h, v = w.shape[0], H // 2, W // 2
    xp = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
    cols = mx.concatenate([xp[:, i:i + 2 * h:2, j:j + 2 * v:2, :] for i in range(3) for j in range(3)], -1)
    gf = g.reshape(-1, O)
    dw = (cols.reshape(-1, 9 * C).T @ gf).reshape(3, 3, C, O).transpose(3, 0, 1, 2)
    d = (gf @ w.reshape(O, 9 * C)).reshape(B, h, v, 3, 3, C)

    def at(i, j, di, dj):  # tap (i, j)'s gradient placed di rows / dj columns down, on an (h+1, v+1) grid
        return mx.pad(d[:, :, :, i, j, :], [(0, 0), (di, 1 - di), (dj, 1 - dj), (0, 0)])

    ee = at(0, 0, 0, 0) + at(2, 0, 1, 0) + at(0, 2, 0, 1) + at(2, 2, 1, 1)  # even row, even column
    eo = at(0, 1, 0, 0) + at(2, 1, 1, 0)  # even row, odd column (last column is padding)
    oe = at(1, 0, 0, 0) + at(1, 2, 0, 1)
    oo = at(1, 1, 0, 0)
    dxp = mx.stack([mx.stack([ee, eo], 3), mx.stack([oe, oo], 3)], 2).reshape(B, 2 * h + 2, 2 * v + 2, C)
    return dxp[:, :H, :W, :], dw, gf.sum(0)


class Upsample(nn.Module):
    """Upstream ``Upsample`` (2d, no pixel shuffle): nearest x2, then conv3x3 pad 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() == mx.cpu and x.dtype == mx.float32:  # see _upsample_conv3x3
            return _upsample_conv3x3(x, self.conv.conv.weight, self.conv.conv.bias)
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
        return self.conv_out(self.norm_out(h, silu=True))


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
        return self.conv_out(self.norm_out(h, silu=True))


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
        """Upstream ``decode``: (B, h, w, d) codes -> (B, 16h, 16w, 3) clamped to [-1, 1].

        On the CPU a bfloat16 model decodes in float32 (its weights promote op by op): MLX's CPU
        convolution, which bf16 would take, copies im2col patches (2.6 GiB for one 3x3 conv at
        512x512, benchmarks/README.md) and has no fast bf16 kernels; the port's float32 path has neither."""
        if mx.default_device() == mx.cpu and z.dtype == mx.bfloat16:
            z = z.astype(mx.float32)
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
