"""Parity of the Qwen2 language model, its M-RoPE position ids and the text decoding loop."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from tests.conftest import sub_weights
from vargpt_mlx.models import qwen2
from vargpt_mlx.models.qwen2 import Qwen2Model, make_attention_mask
from vargpt_mlx.models.rope_index import get_rope_index, plain_position_ids
from vargpt_mlx.text_generation import hf_logits_processors, stream_generate
from vargpt_mlx.tolerances import compare


@pytest.fixture(scope="module")
def llm(config, raw_weights):
    model = Qwen2Model(config.llm)
    model.load_weights(list(qwen2.sanitize(sub_weights(raw_weights, "model")).items()), strict=True)
    return model


@pytest.fixture(scope="module")
def lm_head(config, raw_weights):
    head = nn.Linear(config.llm.hidden_size, config.llm.vocab_size, bias=False)
    head.load_weights([("weight", raw_weights["lm_head.weight"])], strict=True)
    return head


def rope_index(config, refs, prefix, grid=None):
    t = config.tokens
    return get_rope_index(refs[f"{prefix}.input_ids"], grid, refs.get(f"{prefix}.attention_mask"),
                          image_token_id=t.image_token_id, video_token_id=t.video_token_id,
                          vision_start_token_id=t.vision_start_token_id,
                          spatial_merge_size=config.vision.spatial_merge_size)


def und_embeds(llm, config, refs):
    """Prompt embeddings with the reference vision features written into the image pad slots."""
    ids = refs["und.input_ids"]
    slots = np.flatnonzero(ids[0] == config.tokens.image_token_id)
    embeds = llm.embed(mx.array(ids))
    embeds[0, mx.array(slots)] = mx.array(refs["und.vision_embeds"])
    return embeds


def assert_ok(check):
    assert check.ok, check


# ----------------------------------------------------------------------------- position ids
def test_rope_index_image(config, refs):
    pos, deltas = rope_index(config, refs, "und", refs["und.image_grid_thw"])
    assert_ok(compare("und.position_ids", pos, refs["und.position_ids"], tol="exact"))
    assert_ok(compare("und.rope_deltas", deltas, refs["und.rope_deltas"], tol="exact"))


def test_rope_index_text(config, refs):
    pos, deltas = rope_index(config, refs, "txt")
    assert_ok(compare("txt.position_ids", pos, refs["txt.position_ids"], tol="exact"))
    assert_ok(compare("txt.rope_deltas", deltas, refs["txt.rope_deltas"], tol="exact"))


def test_rope_index_padding(config):
    """Masked slots get position 1; text resumes after an image block at max + 1."""
    t = config.tokens
    ids = np.array([[5, 6, t.vision_start_token_id] + [t.image_token_id] * 4 + [t.vision_end_token_id, 7],
                    [0, 0, 5, 6, 7, 8, 9, 10, 11]])
    mask = np.array([[1] * 9, [0, 0] + [1] * 7])
    kw = dict(image_token_id=t.image_token_id, video_token_id=t.video_token_id,
              vision_start_token_id=t.vision_start_token_id)
    pos, deltas = get_rope_index(ids, np.array([[1, 4, 4]]), mask, **kw)
    np.testing.assert_array_equal(pos[:, 0], [[0, 1, 2, 3, 3, 3, 3, 5, 6],
                                              [0, 1, 2, 3, 3, 4, 4, 5, 6],
                                              [0, 1, 2, 3, 4, 3, 4, 5, 6]])
    np.testing.assert_array_equal(pos[:, 1], np.broadcast_to([1, 1, 0, 1, 2, 3, 4, 5, 6], (3, 9)))
    np.testing.assert_array_equal(deltas, [[-2], [-2]])
    pos, deltas = get_rope_index(ids[1:], None, mask[1:], **kw)
    np.testing.assert_array_equal(pos[:, 0], np.broadcast_to([1, 1, 0, 1, 2, 3, 4, 5, 6], (3, 9)))
    np.testing.assert_array_equal(deltas, [[-2]])
    np.testing.assert_array_equal(plain_position_ids(2, 3, offset=4)[:, 1], [[4, 5, 6]] * 3)


# ----------------------------------------------------------------------------- forward logits
def test_logits_mrope(llm, lm_head, config, refs):
    pos, _ = rope_index(config, refs, "und", refs["und.image_grid_thw"])
    logits = lm_head(llm(und_embeds(llm, config, refs), mx.array(pos, dtype=mx.int32)))
    assert_ok(compare("und.logits_mrope", logits, refs["und.logits_mrope"]))


def test_logits_plainpos(llm, lm_head, config, refs):
    L = refs["und.input_ids"].shape[1]
    logits = lm_head(llm(und_embeds(llm, config, refs), mx.array(plain_position_ids(1, L), dtype=mx.int32)))
    assert_ok(compare("und.logits_plainpos", logits, refs["und.logits_plainpos"]))


def test_logits_text(llm, lm_head, refs):
    ids = refs["txt.input_ids"]
    pos = mx.array(plain_position_ids(*ids.shape), dtype=mx.int32)
    logits = lm_head(llm(llm.embed(mx.array(ids)), pos))
    assert_ok(compare("txt.logits", logits, refs["txt.logits"]))


def test_cache_and_padding_mask_match_full_forward(llm, refs):
    """Prefill + one-token steps with a KV cache, and a left-padded batch, equal the full forward."""
    ids = mx.array(refs["txt.input_ids"])
    L = ids.shape[1]
    embeds = llm.embed(ids)

    def run(start, stop, cache=None):
        pos = mx.array(plain_position_ids(1, stop - start, start), dtype=mx.int32)
        return llm(embeds[:, start:stop], pos, cache=cache)

    full = run(0, L)
    cache = llm.make_cache()
    stepped = mx.concatenate([run(0, L - 3, cache), run(L - 3, L - 1, cache), run(L - 1, L, cache)], axis=1)
    assert_ok(compare("cached forward", stepped, full))

    pad = 3
    padded = mx.concatenate([mx.zeros((1, pad, embeds.shape[-1])), embeds], axis=1)
    mask = mx.array([[0] * pad + [1] * L])
    pos = mx.array(np.pad(plain_position_ids(1, L), ((0, 0), (0, 0), (pad, 0)), constant_values=1),
                   dtype=mx.int32)
    out = llm(padded, pos, mask=make_attention_mask(mask, L + pad))
    assert_ok(compare("left-padded forward", out[:, pad:], full))


# ----------------------------------------------------------------------------- decoding
def run_generation(llm, lm_head, config, refs, prefix, embeds, grid=None, **kw):
    pos, deltas = rope_index(config, refs, prefix, grid)
    prompt = refs[f"{prefix}.input_ids"]
    n_new = refs[f"{prefix}.gen_sequences"].shape[1] - prompt.shape[1]
    steps = list(stream_generate(llm, lm_head, embeds, mx.array(pos), int(deltas[0, 0]), max_tokens=n_new,
                                 prompt_ids=prompt[0].tolist(), **kw))
    tokens = np.array([[t for t, _ in steps]])
    return np.concatenate([prompt, tokens], axis=1), np.stack([np.array(l) for _, l in steps])


def test_generate_und(llm, lm_head, config, refs):
    seq, step_logits = run_generation(llm, lm_head, config, refs, "und", und_embeds(llm, config, refs),
                                      refs["und.image_grid_thw"], eos_token_ids=(config.tokens.eos_token_id,))
    assert_ok(compare("und.gen_sequences", seq, refs["und.gen_sequences"], tol="exact"))
    assert_ok(compare("und.gen_step_logits", step_logits, refs["und.gen_step_logits"]))


def test_generate_text(llm, lm_head, config, refs):
    embeds = llm.embed(mx.array(refs["txt.input_ids"]))
    seq, step_logits = run_generation(llm, lm_head, config, refs, "txt", embeds,
                                      eos_token_ids=(config.tokens.eos_token_id,))
    assert_ok(compare("txt.gen_sequences", seq, refs["txt.gen_sequences"], tol="exact"))
    assert_ok(compare("txt.gen_step_logits", step_logits, refs["txt.gen_step_logits"]))


def test_generate_repetition_penalty(llm, lm_head, config, refs):
    t = config.tokens
    seq, _ = run_generation(llm, lm_head, config, refs, "und", und_embeds(llm, config, refs),
                            refs["und.image_grid_thw"], eos_token_ids=(t.eos_token_id, t.pad_token_id),
                            repetition_penalty=1.05)
    assert_ok(compare("und.gen_sequences_reppen", seq, refs["und.gen_sequences_reppen"], tol="exact"))


def test_repetition_penalty_covers_whole_history():
    """HF semantics: every token of the history (prompt included, however long) is penalised once."""
    (processor,) = hf_logits_processors(repetition_penalty=2.0)
    history = mx.array([0, 1, 1] + [3] * 100)
    out = processor(history, mx.array([[1.0, -2.0, 3.0, 4.0]]))
    np.testing.assert_allclose(np.array(out), [[0.5, -4.0, 3.0, 2.0]])


def test_eos_stops_and_is_emitted(llm, lm_head, config, refs):
    """Declaring the second greedy token an eos ends the stream right after emitting it."""
    embeds = llm.embed(mx.array(refs["txt.input_ids"]))
    pos, _ = rope_index(config, refs, "txt")
    L = refs["txt.input_ids"].shape[1]
    eos = int(refs["txt.gen_sequences"][0, L + 1])
    tokens = [t for t, _ in stream_generate(llm, lm_head, embeds, mx.array(pos), 0, max_tokens=16,
                                            eos_token_ids=(eos,))]
    assert tokens == refs["txt.gen_sequences"][0, L: L + 2].tolist()


@pytest.mark.parametrize("name", ["silu", "gelu_approx", "swiglu"])
def test_fast_activation_gradients_equal_mlx(name):
    """The polynomial-exp activations carry written-out derivatives; they equal autodiff of MLX's
    own functions to float32 rounding (one sigmoid evaluated two ways: ~1e-6 relative)."""
    import mlx.nn as nn

    from vargpt_mlx.models import activations as A

    mx.random.seed(0)
    x, u = mx.random.normal((4096,)) * 4, mx.random.normal((4096,))
    fast = {"silu": lambda x: A.silu(x) * u, "gelu_approx": lambda x: A.gelu_approx(x) * u,
            "swiglu": lambda x: A.swiglu(x, u)}[name]
    ref = {"silu": lambda x: nn.silu(x) * u, "gelu_approx": lambda x: nn.gelu_approx(x) * u,
           "swiglu": lambda x: nn.silu(x) * u}[name]
    got, want = mx.grad(lambda x: fast(x).sum())(x), mx.grad(lambda x: ref(x).sum())(x)
    assert float(mx.abs(got - want).max()) <= 8e-6 * max(1.0, float(mx.abs(want).max()))
    if name == "swiglu":
        gu = mx.grad(lambda v: A.swiglu(x, v).sum())(u)
        assert float(mx.abs(gu - nn.silu(x)).max()) <= 2e-6 * float(mx.abs(x).max())


_MASKS = {
    "none": lambda B, H, L, S: None,
    "causal": lambda B, H, L, S: "causal",
    "additive per batch": lambda B, H, L, S: mx.random.normal((B, 1, L, S)),
    "boolean per head": lambda B, H, L, S: mx.random.uniform(shape=(B, H, L, S)) > 0.2,
    "2-D additive": lambda B, H, L, S: mx.random.normal((L, S)),
    "key padding": lambda B, H, L, S: mx.arange(S)[None, None, None] < mx.array([S, S - 7]).reshape(2, 1, 1, 1)[:B],
}


@pytest.mark.parametrize("mask", list(_MASKS))
@pytest.mark.parametrize("chunk_scores", [1 << 30, 2048])  # one chunk / many chunks of 16 rows
def test_cpu_attention_equals_mlx(mask, chunk_scores, monkeypatch):
    """``activations.sdpa`` (the CPU float32 path) against ``mx.fast.scaled_dot_product_attention``,
    values and gradients, GQA (8 query heads on 2 key heads), keys beyond queries.

    Bound: each output is a convex combination of rows of v with weights p; MLX's CPU exp is off by
    up to 3.8e-6 relative (measured against float64), ours by 8e-8, so each p differs by at most
    ~2 x 3.8e-6 relative after normalisation and the output by 8e-6 x max|v|; 1e-5 x max|v| is that
    with float32 accumulation slack (measured: 2-5e-7 with max|v| ~ 4)."""
    from vargpt_mlx.models import activations as A

    monkeypatch.setattr(A, "_CHUNK_SCORES", chunk_scores)
    mx.random.seed(3)
    B, H, Hk, L, S, D = 2, 8, 2, 70, 90, 16
    q, k, v = mx.random.normal((B, H, L, D)), mx.random.normal((B, Hk, S, D)), mx.random.normal((B, Hk, S, D))
    w = mx.random.normal((B, H, L, D))
    m = _MASKS[mask](B, H, L, S)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, scale=0.4, mask=m) * w).sum()

    fast = A.sdpa(q, k, v, scale=0.4, mask=m)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.4, mask=m)
    bound = 1e-5 * float(mx.abs(v).max())
    assert float(mx.abs(fast - want).max()) <= bound
    g_fast = mx.grad(loss(A.sdpa), argnums=(0, 1, 2))(q, k, v)
    g_want = mx.grad(loss(mx.fast.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_fast, g_want):  # the same argument, scaled by the gradients' size
        assert float(mx.abs(a - b).max()) <= 1e-5 * max(1.0, float(mx.abs(b).max()))


def test_cpu_attention_bfloat16_in_float32():
    """bf16 on the CPU attends in float32 and rounds once: the float32 path's output rounded to bf16
    (mask too), and within one bf16 rounding (2**-8 relative to max|v|) plus the float32 bound above
    of the float32 reference; MLX's own bf16 kernel on the CPU is the slow path this avoids."""
    from vargpt_mlx.models import activations as A

    mx.random.seed(4)
    q, k, v = (mx.random.normal((1, 4, 40, 16)).astype(mx.bfloat16) for _ in range(3))
    m = mx.random.normal((1, 1, 40, 40)).astype(mx.bfloat16)
    with mx.stream(mx.cpu):
        got = A.sdpa(q, k, v, scale=0.25, mask=m)
        f32 = [a.astype(mx.float32) for a in (q, k, v, m)]
        want = mx.fast.scaled_dot_product_attention(*f32[:3], scale=0.25, mask=f32[3])
    assert got.dtype == mx.bfloat16
    assert mx.array_equal(got, A.sdpa(*f32[:3], scale=0.25, mask=f32[3]).astype(mx.bfloat16))
    vmax = float(mx.abs(f32[2]).max())
    assert float(mx.abs(got.astype(mx.float32) - want).max()) <= 2.0**-8 * vmax + 1e-5 * vmax


def test_polynomial_exp_floor_by_truncation():
    """``activations._exp`` takes floor(t log2 e + 1/2) by truncation with a correction below zero
    (a vector floor does not exist in the SSE2 kernels MLX compiles on x86-64): the same n as
    ``mx.floor`` for every value, including negative halves and integers, so the same result bit
    for bit; and within 4 float32 ulps (4 * 2**-23 relative) of float64 exp: the degree-7 Taylor
    remainder on |r| <= ln2/2 is < 5e-9, the rest is the rounding of ~12 float32 operations."""
    import math

    import numpy as np

    from vargpt_mlx.models import activations as A

    def exp_with_floor(t):
        big, small = t > 88.0, t < -87.0
        t = mx.clip(t, -87.0, 88.0)
        n = mx.floor(t * A._LOG2E + 0.5)
        r = (t - n * A._LN2_HI) - n * A._LN2_LO
        p = r * (1 / 5040) + A._TAYLOR[0]
        for c in A._TAYLOR[1:]:
            p = p * r + c
        scale = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)
        return mx.where(big, mx.array(math.inf, mx.float32), mx.where(small, mx.array(0.0, mx.float32), p * scale))

    halves = (np.arange(-260, 260, dtype=np.float64) - 0.5) / A._LOG2E  # t log2 e + 1/2 near integers
    t = np.concatenate([np.linspace(-90, 90, 200_001), halves, np.nextafter(halves, 0), [0.0, -0.0, 88.0, -87.0]])
    x = mx.array(t.astype(np.float32))
    got = np.array(mx.compile(A._exp)(x))
    assert np.array_equal(got, np.array(mx.compile(exp_with_floor)(x)))
    ok = (t > -87) & (t < 88)
    ref = np.exp(t.astype(np.float32).astype(np.float64))[ok]
    assert np.max(np.abs(got[ok] - ref) / ref) <= 4 * 2.0**-23
    assert np.all(got[t.astype(np.float32) > 88] == np.inf) and np.all(got[t.astype(np.float32) < -87] == 0)


def test_cpu_attention_in_another_thread(monkeypatch):
    """The two-stream CPU attention works from any thread (MLX streams belong to the thread that
    made them; the server runs the model in a worker thread after others have run it)."""
    import threading

    from vargpt_mlx.models import activations as A

    monkeypatch.setattr(A, "_CHUNK_SCORES", 2048)  # 16-row chunks: the two-stream path
    q, k, v = mx.random.normal((1, 2, 64, 8)), mx.random.normal((1, 2, 300, 8)), mx.random.normal((1, 2, 300, 8))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3)
    bound = 1e-5 * float(mx.abs(v).max())
    errors = [float(mx.abs(A.sdpa(q, k, v, scale=0.3) - want).max())]  # this thread's streams first

    def work():  # evaluated in the worker (an array belongs to the thread whose stream made it)
        errors.append(float(mx.abs(A.sdpa(q, k, v, scale=0.3) - want).max()))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert len(errors) == 2 and max(errors) <= bound, errors


def test_linear_decoding_matrix_vector_path():
    """``models.linear.Linear`` inside ``decoding()``: one row through numpy's matrix-vector
    product, within the float32 error bound of two length-K dot products in different orders
    (each within K * 2**-24 * sum |x_i w_i| of the exact one, so their difference within twice
    that); outside ``decoding()``, or with several rows, exactly ``nn.Linear``."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from vargpt_mlx.models import linear

    mx.random.seed(0)
    lin = linear.Linear(1024, 512, bias=True)
    ref = nn.Linear(1024, 512, bias=True)
    ref.update(lin.parameters())
    assert lin.weight.nbytes >= linear.MIN_BYTES
    x = mx.random.normal((1, 1, 1024))
    assert mx.array_equal(lin(x), ref(x))
    with linear.decoding():
        y = lin(x)
        x4 = mx.random.normal((1, 4, 1024))
        assert mx.array_equal(lin(x4), ref(x4))  # several rows: MLX's matmul
    assert y.shape == (1, 1, 512) and y.dtype == mx.float32
    xn, wn = np.asarray(x).reshape(1, -1), np.asarray(lin.weight)
    assert np.array_equal(np.asarray(y).reshape(1, -1), xn @ wn.T + np.asarray(lin.bias))  # numpy's product ran
    bound = 2 * 1024 * 2.0**-24 * (np.abs(xn) @ np.abs(wn).T) + 2.0**-24 * np.abs(np.asarray(ref(x)).reshape(1, -1))
    assert (np.abs(np.asarray(y) - np.asarray(ref(x))).reshape(1, -1) <= bound).all()  # (+ the bias add's rounding)
