"""SiLU and tanh-GELU for float32 on MLX's CPU backend, without its slow transcendental kernels.

On the CPU backend MLX evaluates ``exp`` / ``sigmoid`` / ``tanh`` element by element at about
20-30 ns per float32 value (a 2 M-element ``nn.silu`` takes ~60 ms on the 2-core test machine, torch
~2 ms), which made the activations a quarter of the VAE decode and a large share of the LLM and
Infinity MLPs. Here ``exp`` is evaluated with plain arithmetic MLX vectorises (Cody-Waite range
reduction, a degree-7 Taylor polynomial on |r| <= ln2/2, the power of two assembled in the exponent
bits) and the whole activation is fused by ``mx.compile`` into one pass:

* ``silu(x) = x / (1 + exp(-x))``;
* ``swiglu(g, u) = silu(g) * u`` (the Qwen2 MLP);
* ``gelu_approx(x) = 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u))`` with
  ``u = sqrt(2/pi) (x + 0.044715 x^3)`` (the same function as ``nn.gelu_approx``).

Measured against float64 on 2 M normal values scaled by 4: ``silu`` max relative error 1.4e-7
(``nn.silu``: 9.2e-7). Where the input is not float32 or the default device is not the CPU, the
functions are ``nn.silu`` / ``nn.gelu_approx`` themselves (Metal's own kernels are fast, and the
polynomial is not meant for bfloat16).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import threading

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 split so that n * _LN2_HI is exact for |n| < 2**12
_LN2_LO = -2.1219444005469057e-4
_TAYLOR = (1 / 720, 1 / 120, 1 / 24, 1 / 6, 0.5, 1.0, 1.0)
_GELU_K = math.sqrt(2.0 / math.pi)


def _exp(t: mx.array) -> mx.array:
    """float32 ``exp(t)``; ``inf`` above 88 (where float32 overflows), 0 below -87 (denormals)."""
    big, small = t > 88.0, t < -87.0
    t = mx.clip(t, -87.0, 88.0)
    # n = floor(t log2(e) + 1/2) as truncation, corrected below zero: MLX compiles CPU kernels for
    # baseline x86-64 (SSE2), which has no vector floor, so ``mx.floor`` ran a libm call per value
    # (measured: this exp 13.1 -> 9.9 ms on 4 M values, bit-identical)
    f = t * _LOG2E + 0.5
    ni = mx.stop_gradient(f).astype(mx.int32)  # n is piecewise constant: no gradient
    ni = ni - (ni.astype(mx.float32) > f).astype(mx.int32)
    n = ni.astype(mx.float32)
    r = (t - n * _LN2_HI) - n * _LN2_LO
    p = r * (1 / 5040) + _TAYLOR[0]
    for c in _TAYLOR[1:]:
        p = p * r + c
    # 2**n from its exponent bits; a constant for autodiff (the derivative flows through p(r))
    scale = mx.stop_gradient(mx.view(mx.left_shift(ni + 127, 23), mx.float32))
    return mx.where(big, mx.array(math.inf, mx.float32), mx.where(small, mx.array(0.0, mx.float32), p * scale))


@mx.compile
def _sigmoid_f32(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + _exp(-x))


# Each fast activation carries its derivative written out: autodiff through ``_exp``'s polynomial,
# clips and selects costs ~3.5x ``nn.silu``'s backward (measured on a 3 M-element VAE activation:
# 244 ms vs 70 ms), the written-out one is one more fused pass.
@mx.custom_function
def _silu_f32(x: mx.array) -> mx.array:
    return _silu_fwd(x)


@mx.compile
def _silu_fwd(x: mx.array) -> mx.array:
    return x / (1.0 + _exp(-x))


@mx.compile
def _silu_bwd(x: mx.array, g: mx.array) -> mx.array:
    s = _sigmoid_f32(x)
    return g * (s * (1.0 + x * (1.0 - s)))


@_silu_f32.vjp
def _silu_vjp(primals, cotangent, output):
    return _silu_bwd(primals, cotangent)  # one input: primals is the array itself


@mx.custom_function
def _gelu_approx_f32(x: mx.array) -> mx.array:
    return _gelu_fwd(x)


@mx.compile
def _gelu_fwd(x: mx.array) -> mx.array:
    u = _GELU_K * (x + 0.044715 * (x * x * x))
    return x / (1.0 + _exp(-2.0 * u))


@mx.compile
def _gelu_bwd(x: mx.array, g: mx.array) -> mx.array:
    s = _sigmoid_f32(2.0 * _GELU_K * (x + 0.044715 * (x * x * x)))  # y = x * s(2u)
    du = _GELU_K * (1.0 + 3 * 0.044715 * (x * x))
    return g * (s + x * s * (1.0 - s) * 2.0 * du)


@_gelu_approx_f32.vjp
def _gelu_vjp(primals, cotangent, output):
    return _gelu_bwd(primals, cotangent)


@mx.custom_function
def _swiglu_f32(gate: mx.array, up: mx.array) -> mx.array:
    return _swiglu_fwd(gate, up)


@mx.compile
def _swiglu_fwd(gate: mx.array, up: mx.array) -> mx.array:
    return gate / (1.0 + _exp(-gate)) * up


@mx.compile
def _swiglu_bwd(gate: mx.array, up: mx.array, g: mx.array) -> tuple[mx.array, mx.array]:
    s = _sigmoid_f32(gate)
    return g * up * (s * (1.0 + gate * (1.0 - s))), g * gate * s


@_swiglu_f32.vjp
def _swiglu_vjp(primals, cotangent, output):
    return _swiglu_bwd(primals[0], primals[1], cotangent)


def _fast(x: mx.array) -> bool:
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu


def silu(x: mx.array) -> mx.array:
    return _silu_f32(x) if _fast(x) else nn.silu(x)


def gelu_approx(x: mx.array) -> mx.array:
    return _gelu_approx_f32(x) if _fast(x) else nn.gelu_approx(x)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` (the Qwen2 MLP's product), fused on the fast path."""
    if _fast(gate) and up.dtype == mx.float32:
        return _swiglu_f32(gate, up)
    return nn.silu(gate) * up


# ---------------------------------------------------------------------------------- attention
@mx.custom_function
def _softmax_f32(s: mx.array) -> mx.array:
    return _softmax_fwd(s)


@mx.compile
def _softmax_fwd(s: mx.array) -> mx.array:
    e = _exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@_softmax_f32.vjp
def _softmax_vjp(primals, cotangent, output):
    return output * (cotangent - (cotangent * output).sum(-1, keepdims=True))


# scores per query chunk of the CPU path: a chunk's scores stay a few MB, so MLX's allocator
# reuses one buffer instead of page-faulting a fresh gigabyte-sized one per op (measured on
# (2, 16, 1024, 64) x 2736 keys: chunks of 16 rows = 1.4 M scores 6.2 ns per score, of 256 rows
# 15 ns; chunks of 4 or 8 rows were slower again: more, smaller GEMM calls); short sequences stay
# one chunk (each op call costs microseconds)
_CHUNK_SCORES = 3 << 19
_MIN_ROWS = 16


def sdpa(q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask=None, cache=None) -> mx.array:
    """``mlx_lm``'s ``scaled_dot_product_attention`` (the models' ``sdpa`` step), with a float32
    CPU path: MLX's CPU ``scaled_dot_product_attention`` spends ~13 ns per score, nearly all of it
    in its ``exp`` (the score matmul is ~1.7 ns); here the softmax uses the polynomial ``_exp``
    over query chunks, computed one after the other (measured on (2, 16, 1024, 64) x 2736 keys:
    744-769 ms and 215 MiB peak, MLX's 1037-1083 ms and 358 MiB). ``mask``: None, "causal"
    (bottom-right aligned), or a boolean / additive array broadcastable to (B, heads, L, S); keys
    may have fewer heads (GQA).

    Outside function transformations the chunks run on two CPU streams, i.e. on both cores (see
    ``cpu_streams``), and the result is evaluated here."""
    if q.dtype == mx.bfloat16 and mx.default_device() == mx.cpu and not hasattr(cache, "bits"):
        # bf16 on the CPU (e.g. ``--dtype bfloat16`` to halve the caches): MLX's CPU kernels have no
        # fast bf16 path, so attend in float32 and round the output once (what Metal's bf16 kernel
        # does inside: float32 accumulation, bf16 output)
        f32 = mx.float32
        m = mask.astype(f32) if isinstance(mask, mx.array) and mask.dtype == mx.bfloat16 else mask
        return sdpa(q.astype(f32), k.astype(f32), v.astype(f32), scale=scale, mask=m, cache=cache).astype(q.dtype)
    B, H, L, D = q.shape
    S, Hk = k.shape[2], k.shape[1]
    if hasattr(cache, "bits") or not _fast(q) or L * S < 4096:
        return scaled_dot_product_attention(q, k, v, cache, scale=scale, mask=mask)
    rep = H // Hk
    q = (q * scale).reshape(B, Hk, rep, L, D)
    kt = k.swapaxes(-1, -2)[:, :, None]
    v = v[:, :, None]
    m = None
    if isinstance(mask, mx.array):
        m = mask if mask.ndim == 4 else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        # heads axis -> (kv heads, group): a per-head mask keeps its order, a shared one broadcasts
        m = m.reshape(m.shape[0], Hk, rep, *m.shape[2:]) if m.shape[1] != 1 else m[:, :, None]
    rows = max(_MIN_ROWS, _CHUNK_SCORES // (B * H * S))

    def chunks(streams):
        outs = []
        for i, s in enumerate(range(0, L, rows)):
            e = min(s + rows, L)
            with mx.stream(streams[i % len(streams)]):
                qc = q[:, :, :, s:e]
                if i >= len(streams):  # after this stream's previous chunk: one chunk's scores per stream
                    qc = mx.depends(qc, outs[i - len(streams)])
                if isinstance(mask, str):  # "causal": query i sees keys j <= i + S - L
                    # keys past the chunk's last visible one would only get exp(-inf) = 0: left out
                    n = min(S, e + S - L)
                    last = mx.arange(s + S - L, e + S - L)[:, None]
                    sc = mx.where(mx.arange(n)[None] <= last, qc @ kt[..., :n], -math.inf)
                    outs.append(_softmax_f32(sc) @ v[..., :n, :])
                    continue
                sc = qc @ kt
                if m is not None:
                    mc = m[..., s:e, :] if m.shape[-2] != 1 else m
                    sc = mx.where(mc, sc, -math.inf) if mc.dtype == mx.bool_ else sc + mc
                outs.append(_softmax_f32(sc) @ v)
        return mx.concatenate(outs, axis=3).reshape(B, H, L, D)

    if L <= rows or not can_eval(q, k, v, m):
        return chunks([mx.default_stream(mx.cpu)])
    with _one_blas_thread():
        out = chunks(cpu_streams())
        mx.eval(out)
    return out


# Both cores for work MLX's CPU backend runs on one: elementwise kernels (the softmax's ``exp``) run
# on the calling stream's single thread, and only the BLAS matmuls use a second core. Alternating
# query chunks between two CPU streams, each with a one-thread BLAS (OpenBLAS set to one thread for
# that evaluation, then restored), keeps both cores busy with chunks of their own: measured on
# (2, 16, 1024, 64) x 2521 keys, 518-618 ms -> 327 ms; with a two-thread BLAS the two streams gained
# nothing (the BLAS threads and the other stream's softmax contend). The BLAS thread count is
# process-wide, so ``sdpa`` evaluates its result itself, which is not allowed inside ``mx.compile``
# / ``mx.vmap`` (their tracers raise): there it keeps to one stream.
_local = threading.local()  # MLX streams belong to the thread that made them


def cpu_streams() -> list:
    """This thread's two CPU streams (each runs its kernels on a thread of its own)."""
    if not hasattr(_local, "streams"):
        _local.streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    return _local.streams


def can_eval(*arrays) -> bool:
    """Evaluate ``arrays`` and say True, or False inside ``mx.compile`` / ``mx.vmap`` (where
    evaluation is not allowed)."""
    try:
        mx.eval([a for a in arrays if a is not None])
    except ValueError:  # a compile / vmap tracer
        return False
    return True


@functools.cache
def _openblas_threads() -> tuple:
    """(get, set) of OpenBLAS's thread count, or () with no OpenBLAS in the process."""
    try:
        lib = ctypes.CDLL(None)
        return lib.openblas_get_num_threads, lib.openblas_set_num_threads
    except (OSError, AttributeError):
        return ()


@contextlib.contextmanager
def _one_blas_thread():
    api = _openblas_threads()
    n = api[0]() if api else 1
    if n > 1:
        api[1](1)
    try:
        yield
    finally:
        if n > 1:
            api[1](n)
