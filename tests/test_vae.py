"""BSQ-VAE and multi-scale BSQ quantiser vs the upstream PyTorch references (public bundle).

Port layout is channels-last; upstream refs are channels-first and are transposed here.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from tests.conftest import sub_weights
from vargpt_mlx.models import bsq
from vargpt_mlx.models.vae import DROPPED, BSQVAE, sanitize, to_uint8
from vargpt_mlx.tolerances import FP32_REL, compare


def _nhwc(a: np.ndarray) -> mx.array:
    """(B, C, H, W) or (B, C, 1, H, W) reference -> (B, H, W, C) mx array."""
    a = a.reshape(a.shape[0], a.shape[1], a.shape[-2], a.shape[-1])
    return mx.array(a.transpose(0, 2, 3, 1))


def _nchw(a) -> np.ndarray:
    return np.array(a).transpose(0, 3, 1, 2)


def _split_scales(bits_bl: np.ndarray, schedule) -> list[mx.array]:
    """(B, L, d) concatenated bit labels -> per-scale (B, h, w, d)."""
    out, start = [], 0
    for h, w in schedule:
        out.append(mx.array(bits_bl[:, start:start + h * w].reshape(bits_bl.shape[0], h, w, -1)))
        start += h * w
    return out


def _cat_scales(bits: list[mx.array]) -> np.ndarray:
    return np.concatenate([np.array(b).reshape(b.shape[0], -1, b.shape[-1]) for b in bits], axis=1)


@pytest.fixture(scope="module")
def schedule(refs_info):
    return [(h, w) for _, h, w in refs_info["info"]["vae"]["scale_schedule"]]


@pytest.fixture(scope="module")
def vae(config, raw_weights):
    model = BSQVAE(config.vae)
    model.load_weights(list(sanitize(sub_weights(raw_weights, "vae_local")).items()), strict=True)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def decoded(vae, refs, schedule):
    """The three reference decodes, batched into one decoder call (the decoder dominates runtime)."""
    inputs = {
        "vae.decode_out": _nhwc(refs["vae.decode_in"]),
        "vae.bsc_recon": bsq.codes_from_bits(_split_scales(refs["vae.bsc_gt_BL"], schedule), schedule),
        "gen.decoded": _nhwc(refs["gen.summed_codes"]),
    }
    out = vae.decode(mx.concatenate(list(inputs.values()), axis=0))
    mx.eval(out)
    return {name: out[i:i + 1] for i, name in enumerate(inputs)}


# ----------------------------------------------------------------------------- weights
def test_sanitize_keeps_unknown_and_drops_only_listed(raw_weights):
    w = sub_weights(raw_weights, "vae_local")
    s = sanitize({**w, "encoder.bogus.weight": mx.zeros((2,))})
    assert set(w) - set(s) == set(DROPPED)
    assert "encoder.bogus.weight" in s
    assert s["encoder.conv_in.conv.weight"].shape == (24, 3, 3, 3)  # OIHW (24,3,3,3) -> OHWI
    assert s["encoder.conv_out.conv.weight"].shape == (32, 3, 3, 48)


# ----------------------------------------------------------------------------- VAE
def test_decode(decoded, refs):
    c = compare("vae.decode_out", _nchw(decoded["vae.decode_out"]), refs["vae.decode_out"])
    assert c.ok, c


@pytest.fixture(scope="module")
def features(vae, refs):
    """Our encoder on the reference image (refs.json ``vae_enc_in_formula``, same float32 ops in HWC)."""
    t = refs["vae.enc_image_u8"].astype(np.float32) / np.float32(255)
    x = (t + t) + np.float32(-1)
    out = vae.encode_features(mx.array(x[None]))
    mx.eval(out)
    return out


def test_encode_raw_features(features, refs):
    c = compare("vae.raw_features", _nchw(features), refs["vae.raw_features"])
    assert c.ok, c


def test_gen_decode_and_uint8(decoded, refs):
    c = compare("gen.decoded", _nchw(decoded["gen.decoded"]), refs["gen.decoded"])
    assert c.ok, c
    c = compare("gen.image_rgb_u8 (decoded)", to_uint8(decoded["gen.decoded"])[0], refs["gen.image_rgb_u8"],
                tol="image_u8")
    assert c.ok, c


def test_to_uint8_truncates(refs):
    got = to_uint8(refs["gen.decoded"].transpose(0, 2, 3, 1))[0]
    c = compare("gen.image_rgb_u8 (ref decoded)", got, refs["gen.image_rgb_u8"], tol="image_u8")
    assert c.ok, c
    assert np.array_equal(got, refs["gen.image_rgb_u8"])


# ----------------------------------------------------------------------------- multi-scale BSQ
def _teacher_forced_residuals(features: mx.array, ref_bits: list[mx.array], schedule) -> list[np.ndarray]:
    """The residual each scale quantises, accumulating codes from the *reference* bits."""
    full, cum, out = schedule[-1], mx.zeros_like(features), []
    for si, (size, bits) in enumerate(zip(schedule, ref_bits)):
        r = features - cum
        out.append(np.array(bsq.downsample_area(r, size) if si != len(schedule) - 1 else r))
        cum = cum + bsq.upsample_trilinear(bsq.bits_to_codes(bits), full)
    return out


def _assert_bits_match_except_near_ties(feats: mx.array, refs, schedule) -> None:
    bits, _, _ = bsq.encode_multiscale(feats, schedule)
    ref_bits = _split_scales(refs["vae.bsc_gt_BL"], schedule)
    residuals = _teacher_forced_residuals(feats, ref_bits, schedule)
    tie = FP32_REL * max(float(np.abs(refs["vae.raw_features"]).max()), 1.0)
    confident = np.concatenate([np.abs(r).reshape(1, -1, r.shape[-1]) for r in residuals], axis=1) > tie
    diff = _cat_scales(bits) != refs["vae.bsc_gt_BL"]
    msg = f"{int(diff.sum())} differing bits, {int((~confident).sum())} near-ties (|r| <= {tie:.1e})"
    assert not (diff & confident).any(), msg


def test_flip_requant_bits_exact_except_near_ties(refs, schedule):
    _assert_bits_match_except_near_ties(_nhwc(refs["vae.raw_features"]), refs, schedule)


def test_image_to_bits_end_to_end(features, refs, schedule):
    _assert_bits_match_except_near_ties(features, refs, schedule)


def test_flip_requant_teacher_inputs_and_summed(refs, schedule):
    _, x_blc, summed = bsq.encode_multiscale(_nhwc(refs["vae.raw_features"]), schedule)
    c = compare("vae.bsc_x_BLC_wo_prefix", np.array(x_blc), refs["vae.bsc_x_BLC_wo_prefix"])
    assert c.ok, c
    c = compare("vae.bsc_summed_codes", _nchw(summed)[:, :, None], refs["vae.bsc_summed_codes"])
    assert c.ok, c


def test_bsc_recon(decoded, refs):
    c = compare("vae.bsc_recon", _nchw(decoded["vae.bsc_recon"]), refs["vae.bsc_recon"])
    assert c.ok, c


def test_msbsq_forward(refs, schedule):
    z, bits = bsq.msbsq_forward(_nhwc(refs["vae.raw_features"]), schedule)
    c = compare("vae.msbsq_z", _nchw(z), refs["vae.msbsq_z"])
    assert c.ok, c
    c = compare("vae.msbsq_bits", _cat_scales(bits), refs["vae.msbsq_bits"], tol="exact")
    assert c.ok, c


def test_gen_codes_and_next_scale_inputs(refs, schedule):
    bits = [mx.array(refs[f"gen.s{k}.bits"].reshape(1, h, w, -1)) for k, (h, w) in enumerate(schedule)]
    for k in range(1, len(schedule)):
        nxt = bsq.next_scale_input(bsq.codes_from_bits(bits[:k], schedule), schedule[k])
        c = compare(f"gen.s{k}.next_in_codes", np.array(nxt), refs[f"gen.s{k}.next_in_codes"])
        assert c.ok, c
    c = compare("gen.summed_codes", _nchw(bsq.codes_from_bits(bits, schedule)), refs["gen.summed_codes"])
    assert c.ok, c


# ----------------------------------------------------------------------------- interpolation units
def _torch_linear_ref(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Direct transcription of ATen's align_corners=False linear interpolation along one axis."""
    n_in = x.shape[axis]
    scale = n_in / n_out
    slices = []
    for i in range(n_out):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = i0 + 1 if i0 < n_in - 1 else i0
        lam = src - i0
        slices.append((1 - lam) * np.take(x, i0, axis) + lam * np.take(x, i1, axis))
    return np.stack(slices, axis=axis)


def _torch_area_ref(x: np.ndarray, size) -> np.ndarray:
    """Direct transcription of adaptive_avg_pool2d on (B, H, W, C)."""
    b, hin, win, c = x.shape
    out = np.zeros((b, size[0], size[1], c))
    for i in range(size[0]):
        h0, h1 = (i * hin) // size[0], -(-((i + 1) * hin) // size[0])
        for j in range(size[1]):
            w0, w1 = (j * win) // size[1], -(-((j + 1) * win) // size[1])
            out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("size", [(6, 5), (7, 12), (12, 9), (3, 1)])
def test_area_non_square_non_divisible(size):
    x = np.random.default_rng(0).standard_normal((2, 16, 12, 3)).astype(np.float32)
    got = np.array(bsq.downsample_area(mx.array(x), size))
    ref = _torch_area_ref(x.astype(np.float64), size)
    c = compare(f"area {x.shape[1:3]}->{size}", got, ref)
    assert c.ok, c


@pytest.mark.parametrize("src,size", [((3, 2), (16, 12)), ((16, 12), (6, 5)), ((5, 7), (12, 9)), ((1, 1), (4, 3))])
def test_trilinear_non_square_non_divisible(src, size):
    x = np.random.default_rng(1).standard_normal((2, *src, 3)).astype(np.float32)
    got = np.array(bsq.upsample_trilinear(mx.array(x), size))
    ref = _torch_linear_ref(_torch_linear_ref(x.astype(np.float64), 2, size[1]), 1, size[0])
    c = compare(f"trilinear {src}->{size}", got, ref)
    assert c.ok, c


def test_non_square_schedule_round_trip():
    """A 16x12 schedule (h/w 1.333): shapes, teacher length, and summed == codes_from_bits."""
    schedule = [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12)]
    feats = mx.array(np.random.default_rng(2).standard_normal((1, 16, 12, 32)).astype(np.float32))
    bits, x_blc, summed = bsq.encode_multiscale(feats, schedule)
    assert [b.shape[1:3] for b in bits] == schedule
    assert x_blc.shape == (1, sum(h * w for h, w in schedule[1:]), 32)
    c = compare("summed vs codes_from_bits", np.array(summed), np.array(bsq.codes_from_bits(bits, schedule)))
    assert c.ok, c


def test_interpolation_and_straight_through_are_differentiable():
    x = mx.array(np.random.default_rng(3).standard_normal((1, 16, 12, 32)).astype(np.float32))

    def loss(v):
        z, _ = bsq.msbsq_forward(v, [(1, 1), (6, 5), (16, 12)])
        return mx.sum(bsq.upsample_trilinear(bsq.downsample_area(v, (7, 5)), (16, 12)) ** 2) + mx.sum(z)

    g = mx.grad(loss)(x)
    assert g.shape == x.shape and bool(mx.all(mx.isfinite(g)))


# ---------------------------------------------------------------- written-out gradients (CPU fast paths)
def _grads(f, args):
    return mx.grad(f, argnums=tuple(range(len(args))))(*args)


def _close(got, ref, terms):
    """float32 gradients of the same sums in another order: each element is a sum of ``terms``
    products, so the two differ by at most ~terms * 2**-24 * sum|products|; bounded here by
    ``terms * 2**-22 * max|ref|`` per tensor (4x headroom for the magnitude of the addends)."""
    for g, r in zip(got, ref):
        bound = terms * 2.0**-22 * max(1.0, float(mx.abs(r).max()))
        assert float(mx.abs(g - r).max()) <= bound


@pytest.mark.parametrize("shape", [(2, 6, 8, 3, 4), (1, 4, 10, 5, 2)])
def test_conv_fast_path_gradients_equal_autodiff_of_the_plain_conv(shape):
    """The CPU convolutions' gradients (3x3 pad 1 and pad + stride-2 3x3: written-out VJPs;
    nearest-upsample + 3x3: autodiff through its four phases) equal autodiff of MLX's own ``conv2d``
    formulation of the same layer."""
    from vargpt_mlx.models import vae as V

    B, H, W, C, O = shape
    mx.random.seed(sum(shape))
    x, w, b = mx.random.normal((B, H, W, C)), mx.random.normal((O, 3, 3, C)), mx.random.normal((O,))
    up = lambda x: mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
    pad = lambda x: mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
    cases = [(V._conv3x3_rows, lambda x, w, b: mx.conv2d(x, w, padding=1) + b, (B, H, W, O)),
             (V._upsample_conv3x3, lambda x, w, b: mx.conv2d(up(x), w, padding=1) + b, (B, 2 * H, 2 * W, O)),
             (V._downsample_conv, lambda x, w, b: mx.conv2d(pad(x), w, stride=2) + b, (B, H // 2, W // 2, O))]
    for fast, plain, out_shape in cases:
        g = mx.random.normal(out_shape)
        got = _grads(lambda *a: (fast(*a) * g).sum(), (x, w, b))
        ref = _grads(lambda *a: (plain(*a) * g).sum(), (x, w, b))
        _close(got, ref, terms=B * H * W * 4)  # weight gradients sum over every (upsampled) pixel


def test_groupnorm_silu_in_runs_equals_one_pass(monkeypatch):
    """Large activations run GroupNorm's statistics and its affine + SiLU in runs of positions
    (memory); every value takes the same operations, and the runs are whole first-level blocks of
    ``_blocked_sum``, so the result is bit-identical to one pass (a batch of 2; runs that do not
    divide the positions; positions that are not whole blocks, which take one pass)."""
    from vargpt_mlx.models import vae as vae_mod

    norm = vae_mod.Normalize(96)
    norm.norm.weight = mx.random.normal((96,), key=mx.random.key(1))
    norm.norm.bias = mx.random.normal((96,), key=mx.random.key(2))
    for shape in [(2, 40, 24, 96), (2, 37, 23, 96)]:  # 960 positions = 15 blocks of 64; 851
        x = 3 * mx.random.normal(shape, key=mx.random.key(3)) + 1.5
        monkeypatch.setattr(vae_mod, "_CHUNK_ELEMENTS", 1 << 40)
        assert vae_mod._runs(x.reshape(2, -1, 96)) is None
        one = norm(x, silu=True)
        monkeypatch.setattr(vae_mod, "_CHUNK_ELEMENTS", 2 * 96 * 256)  # runs of 256 positions: 4 runs
        runs = vae_mod._runs(x.reshape(2, -1, 96))
        assert (runs is not None) == (shape[1] * shape[2] % 64 == 0)
        assert mx.array_equal(norm(x, silu=True), one).item()


def test_groupnorm_silu_runs_bound_the_transient(monkeypatch):
    """One pass holds the centred copy, its square and the polynomial SiLU's full-size temporaries
    (~6x the input); in runs, the output and its pieces (2x) plus a run's temporaries."""
    from vargpt_mlx.models import vae as vae_mod

    norm = vae_mod.Normalize(64)
    x = mx.random.normal((1, 128, 128, 64))  # 4 MiB
    mx.eval(x, norm.parameters())

    def peak():
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(norm(x, silu=True))
        return (mx.get_peak_memory() - base) / x.nbytes

    with mx.stream(mx.cpu):
        monkeypatch.setattr(vae_mod, "_CHUNK_ELEMENTS", 1 << 40)
        one = peak()
        monkeypatch.setattr(vae_mod, "_CHUNK_ELEMENTS", 1 << 16)  # runs of 1024 positions, 0.25 MiB
        runs = peak()
    assert one > 4 and runs < 2.5, (one, runs)  # measured: 9.0 and 2.0


def test_cpu_allocator_settings_apply_once_and_opt_out():
    """Importing the models applies the glibc settings on Linux with the CPU backend (freed
    buffers reused instead of page-faulted back; ``vargpt_mlx.cpu_allocator``);
    ``VARGPT_MLX_NO_MALLOC_TUNING=1`` leaves malloc alone."""
    import os
    import subprocess
    import sys

    code = "import vargpt_mlx.models, vargpt_mlx.cpu_allocator as c; print(c._done)"
    env = {k: v for k, v in os.environ.items() if k != "VARGPT_MLX_NO_MALLOC_TUNING"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], env=dict(env, VARGPT_MLX_NO_MALLOC_TUNING="1"),
                         capture_output=True, text=True, check=True)
    expected = sys.platform == "linux" and mx.default_device() == mx.cpu
    assert on.stdout.strip() == str(expected) and off.stdout.strip() == "False"


def test_bfloat16_model_decodes_in_float32_on_the_cpu():
    """A bf16 VAE on the CPU decodes bf16 codes in float32 (its weights promote op by op: MLX's CPU
    convolution has no fast bf16 path): the same as float32 codes into the same weights."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from vargpt_mlx.config import VAEConfig
    from vargpt_mlx.models.vae import BSQVAE

    mx.random.seed(0)
    vae = BSQVAE(VAEConfig(base_ch=24, encoder_ch_mult=(1, 1, 1, 1, 1), decoder_ch_mult=(1, 1, 1, 1, 1),
                           num_res_blocks=0, codebook_dim=8, z_channels=8, patch_size=16))
    vae.update(tree_map(lambda a: a.astype(mx.bfloat16), vae.parameters()))
    z = mx.random.normal((1, 2, 2, 8)).astype(mx.bfloat16)
    with mx.stream(mx.cpu):
        out = vae.decode(z)
        ref = vae.decode(z.astype(mx.float32))
    assert out.dtype == mx.float32 and out.shape == (1, 32, 32, 3)
    assert mx.array_equal(out, ref)
