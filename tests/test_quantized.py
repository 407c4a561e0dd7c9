"""``models/quantized.py``: on the CPU, quantized linears with many rows dequantize and use the BLAS;
the function is the one ``quantized_matmul`` computes."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from vargpt_mlx.models import activations, quantized


def _layer(k: int, n: int, bits: int, bias: bool) -> nn.QuantizedLinear:
    mx.random.seed(0)
    lin = nn.Linear(k, n, bias=bias)
    if bias:
        lin.bias = mx.random.normal((n,))
    return quantized.use_cpu_path(nn.QuantizedLinear.from_linear(lin, group_size=32, bits=bits))


def _bound(x: mx.array, q: nn.QuantizedLinear) -> np.ndarray:
    """Both results are float32 sums of the same K products x_i * w_i in different orders; each is
    within gamma_K * sum_i |x_i w_i| of the exact sum (gamma_K = K eps / (1 - K eps), the standard
    bound for recursive summation, which also covers blocked and pairwise orders), so they are
    within twice that of each other. The product and the bias add contribute one more rounding."""
    w = np.asarray(mx.dequantize(q.weight, q.scales.astype(mx.float32), q.biases.astype(mx.float32),
                                 group_size=q.group_size, bits=q.bits), np.float64)
    k, eps = w.shape[1], np.finfo(np.float32).eps / 2
    gamma = k * eps / (1 - k * eps)
    mag = np.abs(np.asarray(x, np.float64)) @ np.abs(w).T
    return 2 * (gamma + eps) * mag + 4 * eps * (np.abs(np.asarray(q["bias"])) if "bias" in q else 0)


@pytest.mark.parametrize("bits,bias", [(4, False), (8, True)])
def test_many_rows_same_function_as_quantized_matmul(bits, bias, monkeypatch):
    q = _layer(96, 80, bits, bias)
    x = mx.random.normal((3, 5, 96))  # 15 rows >= MIN_ROWS
    calls = []
    real = mx.quantized_matmul
    monkeypatch.setattr(mx, "quantized_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    with mx.stream(mx.cpu):
        y = q(x)
    assert not calls, "15 rows on the CPU should take the dequantize + BLAS path"
    ref = nn.QuantizedLinear.__call__(q, x)
    assert calls
    assert y.shape == ref.shape == (3, 5, 80)
    err = np.abs(np.asarray(y, np.float64) - np.asarray(ref, np.float64))
    assert (err <= _bound(x, q)).all(), err.max()


def test_few_rows_keep_quantized_matmul(monkeypatch):
    q = _layer(64, 48, 4, False)
    calls = []
    real = mx.quantized_matmul
    monkeypatch.setattr(mx, "quantized_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = mx.random.normal((1, quantized.MIN_ROWS - 1, 64))
    with mx.stream(mx.cpu):
        y = q(x)
    assert len(calls) == 1
    assert np.array_equal(np.asarray(y), np.asarray(nn.QuantizedLinear.__call__(q, x)))


def test_pieces_bound_the_dequantized_transient(monkeypatch):
    """With CHUNK at 1/4 of the weight, the output is put together from 4 pieces of whole output
    features, each computed exactly as the single-piece path computes those features."""
    q = _layer(64, 40, 4, True)
    x = mx.random.normal((12, 64))
    with mx.stream(mx.cpu):
        whole = q(x)
        monkeypatch.setattr(quantized, "CHUNK", 64 * 10)
        seen = []
        real = mx.dequantize
        monkeypatch.setattr(mx, "dequantize", lambda w, *a, **k: seen.append(w.shape[0]) or real(w, *a, **k))
        pieces = q(x)
    assert seen == [10, 10, 10, 10]
    err = np.abs(np.asarray(pieces, np.float64) - np.asarray(whole, np.float64))
    assert (err <= _bound(x, q)).all(), err.max()


def test_loaded_quantized_model_uses_the_cpu_path(tmp_path):
    """``load_model`` of a quantized directory gives the CPU path to every quantized linear, and
    they are still ``nn.QuantizedLinear`` (LoRA, fuse and the key layout rely on that)."""
    from vargpt_mlx.convert.convert import QuantSpec, quantize_checkpoint
    from vargpt_mlx.loading import load_model
    from vargpt_mlx.hub import NANO_DIR

    quantize_checkpoint(NANO_DIR, tmp_path / "q", quant=QuantSpec(bits=4, group_size=32), force=True)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["bits"] == 4
    layers = [m for _, m in load_model(tmp_path / "q").named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(type(m) is quantized.QuantizedLinear for m in layers)


def test_one_dequantized_piece_in_flight(monkeypatch):
    """A dequantize depends on weights alone, so without the chaining in ``QuantizedLinear`` MLX runs
    every piece of every layer of a graph first: here 8 layers of 4 MiB dequantized each would hold
    32 MiB at once. Chained, the peak over the weights stays within a few pieces."""
    monkeypatch.setattr(quantized, "CHUNK", 1 << 16)  # 256 KiB pieces
    layers = [_layer(512, 2048, 4, False) if i % 2 == 0 else _layer(2048, 512, 4, False) for i in range(8)]
    x = mx.random.normal((16, 512))
    with mx.stream(mx.cpu):
        mx.eval(x, [m.parameters() for m in layers])
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        y = x
        for m in layers:
            y = m(y)
        mx.eval(y)
    over = mx.get_peak_memory() - base
    assert over < 4 * 2**20, over / 2**20  # one layer's whole dequantized weight; all 8: 32 MiB


def test_gradient_through_the_cpu_path():
    """QLoRA trains through frozen quantized linears: the input gradient is the same function."""
    q = _layer(64, 48, 4, True)
    x = mx.random.normal((16, 64))
    with mx.stream(mx.cpu):
        g = mx.grad(lambda x: (q(x) ** 2).sum())(x)
        ref = mx.grad(lambda x: (nn.QuantizedLinear.__call__(q, x) ** 2).sum())(x)
    # both are float32 sums of 48 products of the same values (y itself within the bound of the first
    # test): 1e-4 relative is ~800 ulps of order noise, and 700x under a one-q4-step weight error (~7 %)
    assert np.allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-5 * float(mx.abs(ref).max().item()))


def test_bfloat16_activations_multiply_in_float32():
    """bf16 activations on the CPU: the product in float32, rounded to bf16 once at the end, so the
    result is within one bf16 rounding (unit roundoff 2**-8) plus the float32 order bound of the exact
    product of the same values. (MLX's own bf16 quantized_matmul on the CPU was 0.039 off here on
    values of ~0.5: it accumulates with less precision.)"""
    q = _layer(96, 40, 4, False)
    q.update({k: v.astype(mx.bfloat16) for k, v in q.parameters().items() if k in ("scales", "biases")})
    x = mx.random.normal((16, 96)).astype(mx.bfloat16)
    with mx.stream(mx.cpu):
        y = q(x)
    assert y.dtype == mx.bfloat16
    x32 = x.astype(mx.float32)
    w = np.asarray(mx.dequantize(q.weight, q.scales.astype(mx.float32), q.biases.astype(mx.float32),
                                 group_size=32, bits=4), np.float64)  # the bf16 scales' exact values
    exact = np.asarray(x32, np.float64) @ w.T
    err = np.abs(np.asarray(y.astype(mx.float32), np.float64) - exact)
    assert (err <= 2.0**-8 * np.abs(exact) + _bound(x32, q)).all(), err.max()


# ------------------------------------------------------------------ MLPs in pieces of the hidden features
def _mlp(kind: str, dim: int, hidden: int, dtype=mx.float32):
    from vargpt_mlx.models import infinity, qwen2

    mx.random.seed(1)
    m = qwen2.MLP(dim, hidden) if kind == "qwen2" else infinity.FFN(dim, hidden)
    if kind == "ffn":  # biases that matter
        m.fc1.bias = 0.5 * mx.random.normal((hidden,))
        m.fc2.bias = 0.5 * mx.random.normal((dim,))
    m.set_dtype(dtype)
    nn.quantize(m, group_size=32, bits=4)
    return quantized.use_cpu_path(m)


def _deq(q) -> np.ndarray:
    return np.asarray(mx.dequantize(q.weight, q.scales.astype(mx.float32), q.biases.astype(mx.float32),
                                    group_size=q.group_size, bits=q.bits), np.float64)


def _mlp_bound(kind: str, m, x: mx.array) -> np.ndarray:
    """Both paths compute the same values in float32 with different summation orders (the pieces'
    first-layer dot products may block differently; ``down`` sums per piece, then across pieces).
    First layers: within 2 (gamma_D + eps) |x| |W1|^T of each other (gamma_K = K eps / (1 - K eps));
    the activation moves by at most its slope times that (|silu'| <= 1.1, |gelu'| <= 1.13) plus a
    few roundings of its own (4 eps |a|); ``down``: |Wd| times the activation's difference plus
    2 (gamma_H + eps) |a| |Wd|^T."""
    eps = np.finfo(np.float32).eps / 2
    gamma = lambda k: k * eps / (1 - k * eps)  # noqa: E731
    xf = np.abs(np.asarray(x, np.float64)).reshape(-1, x.shape[-1])
    firsts, down = ([m.gate_proj, m.up_proj], m.down_proj) if kind == "qwen2" else ([m.fc1], m.fc2)
    ws = [_deq(f) for f in firsts]
    hs = [np.asarray(x, np.float64).reshape(-1, x.shape[-1]) @ w.T + (np.asarray(f["bias"]) if "bias" in f else 0)
          for f, w in zip(firsts, ws)]
    dh = [2 * (gamma(x.shape[-1]) + eps) * (xf @ np.abs(w).T) + 4 * eps * np.abs(h) for w, h in zip(ws, hs)]
    if kind == "qwen2":
        g, u = hs
        silu = g / (1 + np.exp(-g))
        a = silu * u
        da = 1.1 * np.abs(u) * dh[0] + np.abs(silu) * dh[1]
    else:
        (h,) = hs
        a = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        da = 1.13 * dh[0]
    da = da + 4 * eps * np.abs(a)
    wd = np.abs(_deq(down))
    dy = da @ wd.T + 2 * (gamma(a.shape[-1]) + eps) * (np.abs(a) @ wd.T) + 4 * eps * np.abs(a @ _deq(down).T)
    return dy.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("kind", ["qwen2", "ffn"])
def test_mlp_in_hidden_pieces_same_function(kind, monkeypatch):
    """A Qwen2 MLP / Infinity FFN of quantized layers computes one piece of the hidden features at a
    time (4 pieces here) and gives the plain path's result within the float32 order bound."""
    m = _mlp(kind, 64, 256)
    x = mx.random.normal((2, 20, 64))
    monkeypatch.setattr(quantized, "CHUNK", 64 * 64)  # 64 hidden features per piece
    seen = []
    real = mx.dequantize
    monkeypatch.setattr(mx, "dequantize", lambda w, *a, **k: seen.append(w.shape) or real(w, *a, **k))
    with mx.stream(mx.cpu):
        y = m(x)
        n_fused = len(seen)
        monkeypatch.setattr(quantized, "mlp", lambda *a: None)
        ref = m(x)
    firsts = 2 if kind == "qwen2" else 1
    assert n_fused == 4 * (firsts + 1), seen  # per piece: each first layer's rows, down's columns
    err = np.abs(np.asarray(y, np.float64) - np.asarray(ref, np.float64))
    assert (err <= _mlp_bound(kind, m, x)).all(), err.max()


def test_mlp_pieces_bound_the_hidden_transient(monkeypatch):
    """What the pieces are for: the plain path holds the whole hidden activation several times over
    (float32 products, their concatenation, the activation's temporaries); in pieces, one piece of
    it. Here the hidden activation is 512 x 4096 float32 = 8 MiB, a piece 512 x 256 (0.5 MiB)."""
    monkeypatch.setattr(quantized, "CHUNK", 1 << 16)
    m = _mlp("qwen2", 256, 4096)
    x = mx.random.normal((512, 256))

    def peak(fn):
        with mx.stream(mx.cpu):
            mx.eval(x, m.parameters())
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            mx.eval(fn())
        return (mx.get_peak_memory() - base) / 2**20

    fused = peak(lambda: m(x))
    plain = peak(lambda: m.down_proj(activations.swiglu(m.gate_proj(x), m.up_proj(x))))
    assert plain > 16 and fused < 8, (fused, plain)  # measured: 84 and 5.5 MiB


def test_mlp_bfloat16_rounds_like_the_plain_path(monkeypatch):
    """bf16: each piece's first-layer outputs reach the activation rounded to bf16 and the activation
    runs in bf16, as in the plain path; ``down`` accumulates in float32 and rounds once at the end.
    The activations of both paths are recorded, so the bound uses their measured difference da (zero
    unless a float32 summation-order difference crossed a bf16 rounding midpoint): the outputs before
    their final rounding differ by at most |Wd| da + 2 (gamma_K + eps) |a| |Wd|^T (float32 order), and
    each final rounding adds at most u |y| (u = 2**-8, over |y| / (1 - u), hence the factor)."""
    monkeypatch.setattr(quantized, "CHUNK", 64 * 64)  # 4 pieces
    m = _mlp("qwen2", 64, 256, mx.bfloat16)
    x = mx.random.normal((40, 64)).astype(mx.bfloat16)
    seen = {"pieces": [], "plain": []}

    def recorded(key):
        def act(g, u_):
            a = activations.swiglu(g, u_)
            seen[key].append((g.dtype, u_.dtype, a))
            return a
        return act

    with mx.stream(mx.cpu):
        y = quantized.mlp(x, [m.gate_proj, m.up_proj], recorded("pieces"), m.down_proj)
        ref = m.down_proj(recorded("plain")(m.gate_proj(x), m.up_proj(x)))
    assert y is not None and y.dtype == ref.dtype == mx.bfloat16
    assert len(seen["pieces"]) == 4 and len(seen["plain"]) == 1
    assert all(dg == du == mx.bfloat16 for dg, du, _ in seen["pieces"] + seen["plain"])
    f64 = lambda t: np.asarray(t.astype(mx.float32), np.float64)  # noqa: E731
    a_pieces = np.concatenate([f64(a) for _, _, a in seen["pieces"]], axis=-1)
    a_plain = f64(seen["plain"][0][2])
    u, eps, K = 2.0**-8, np.finfo(np.float32).eps / 2, a_plain.shape[-1]
    wd = np.abs(_deq(m.down_proj))
    y64, r64 = f64(y), f64(ref)
    bound = (np.abs(a_pieces - a_plain) @ wd.T + 2 * (K * eps / (1 - K * eps) + eps) * (np.abs(a_plain) @ wd.T)
             + u / (1 - u) * (np.abs(y64) + np.abs(r64)))
    assert (np.abs(y64 - r64) <= bound).all(), np.abs(y64 - r64).max()


def test_bfloat16_few_rows_multiply_in_float32(monkeypatch):
    """Below MIN_ROWS bf16 activations keep ``quantized_matmul`` but in float32 (MLX's bf16 CPU kernel
    is ~9x slower), rounded once: within one bf16 rounding plus the float32 order bound of the exact
    product of the same values."""
    q = _layer(96, 40, 4, False)
    q.update({k: v.astype(mx.bfloat16) for k, v in q.parameters().items() if k in ("scales", "biases")})
    x = mx.random.normal((1, quantized.MIN_ROWS - 1, 96)).astype(mx.bfloat16)
    dtypes = []
    real = mx.quantized_matmul
    monkeypatch.setattr(mx, "quantized_matmul", lambda x, *a, **k: dtypes.append(x.dtype) or real(x, *a, **k))
    with mx.stream(mx.cpu):
        y = q(x)
    assert dtypes == [mx.float32] and y.dtype == mx.bfloat16
    x32 = x.astype(mx.float32)
    w = np.asarray(mx.dequantize(q.weight, q.scales.astype(mx.float32), q.biases.astype(mx.float32),
                                 group_size=32, bits=4), np.float64)
    exact = np.asarray(x32, np.float64) @ w.T
    err = np.abs(np.asarray(y.astype(mx.float32), np.float64) - exact)
    assert (err <= 2.0**-8 * np.abs(exact) + _bound(x32, q)).all(), err.max()
