"""``vargpt-mlx verify``: the public bundle end to end, the checker's rules (``compare``, the
``measured`` rule, the near-tie rule for bits), and mutation tests: one perturbed element in any
reference family must make verify fail."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from vargpt_mlx.cli.main import app
from tests.conftest import CKPT, FIXTURES
from vargpt_mlx import tolerances as T
from vargpt_mlx.tolerances import bits_agree_where_confident, bits_check, compare, measured
from vargpt_mlx.verify import Bundle, Verifier, verify

REFS = FIXTURES / "refs.safetensors"


# ------------------------------------------------------------------------------------------ end to end
def test_verify_public_bundle_every_family_passes():
    results = verify(CKPT, REFS)
    failed = [c for _, c in results if not c.ok]
    assert not failed, failed
    families = {fam for fam, _ in results}
    assert families == set(Verifier.FAMILIES), families
    compared = {c.name for _, c in results}
    # every output family of the reference file is compared
    for must in ("pre.pixel_values", "und.vision_embeds", "und.position_ids", "und.logits_mrope",
                 "und.logits_plainpos", "txt.logits", "und.gen_sequences", "txt.gen_sequences",
                 "und.gen_sequences_reppen", "gen.sequences", "gen.s6.bit_logits_cfg", "gen.s6.bits",
                 "gen.s3.llm_out_uncond", "gen.summed_codes", "gen.decoded", "gen.image_rgb_u8",
                 "gen.free_running", "vae.decode_out", "vae.bsc_gt_BL", "vae.bsc_recon", "sft_t2i.loss_total",
                 "sft_t2i.gt_BL", "sft_und.loss_plainpos", "sft_und.loss_mrope"):
        assert must in compared, must
    # the bundle carries the reference's measured rounding distance: float checks use it
    kinds = {c.name: c.kind for _, c in results}
    assert kinds["und.logits_mrope"] == kinds["vae.decode_out"] == kinds["gen.s6.bit_logits_cfg"] == "measured"
    assert kinds["gen.s6.bits"] == kinds["vae.bsc_gt_BL"] == "bits"


def test_verify_cli_prints_table_and_exits_zero():
    r = CliRunner().invoke(app, ["verify", "--model", str(CKPT), "--refs", str(REFS)])
    assert r.exit_code == 0, r.output
    assert "0 failed" in r.output and "und.logits_mrope" in r.output


def test_verify_cli_fails_on_mismatch(tmp_path):
    """A perturbed reference must make verify exit non-zero and say FAIL."""
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "bundle"
    d.mkdir()
    shutil.copy(FIXTURES / "refs.json", d / "refs.json")
    refs = load_file(str(REFS))
    refs = {k: v for k, v in refs.items() if k.startswith("txt.")}
    refs["txt.logits"] = refs["txt.logits"] + np.float32(0.01)
    save_file(refs, str(d / "refs.safetensors"))
    r = CliRunner().invoke(app, ["verify", "--model", str(CKPT), "--refs", str(d / "refs.safetensors")])
    assert r.exit_code == 1
    assert "FAIL" in r.output


def test_verify_cli_bad_model_is_one_line_error(tmp_path):
    r = CliRunner().invoke(app, ["verify", "--model", str(tmp_path / "nope"), "--refs", str(REFS)])
    assert r.exit_code == 2
    assert "does not exist" in r.output and "Traceback" not in r.output


def test_verify_bf16_checkpoint_against_bf16_refs():
    """The bf16 checkpoint (as released upstream) against upstream's bf16 run."""
    results = verify(FIXTURES / "checkpoint_bf16", FIXTURES / "refs_bf16.safetensors")
    failed = [c for _, c in results if not c.ok]
    assert not failed, failed
    compared = {c.name for _, c in results}
    assert {"und.logits_mrope", "gen.s6.bit_logits_cfg", "gen.s6.bits", "gen.image_rgb_u8",
            "sft_t2i.loss_total"} <= compared
    # held to upstream's own bf16 rounding distance, measured by the recorder (refs.json info.rounding)
    assert {c.kind for _, c in results} <= {"measured", "exact", "bits"}, {c.kind for _, c in results}
    bits = [c for _, c in results if c.name.endswith(".bits")]
    assert all("near-ties" in c.note for c in bits)


# ------------------------------------------------------------------------------------------ compare
def test_compare_legacy_kinds():
    ref = np.linspace(-3, 3, 50, dtype=np.float32)
    assert compare("x", ref + 1e-5, ref).ok  # rel 1e-4 of scale 3
    assert not compare("x", ref + 1e-3, ref).ok
    assert not compare("x", ref[:-1], ref).ok  # shape
    assert compare("i", np.arange(5), np.arange(5), "exact").ok
    assert not compare("i", np.arange(5) + (np.arange(5) == 2), np.arange(5), "exact").ok
    assert compare("p", ref + 5e-7, ref, "preprocess").ok and not compare("p", ref + 5e-6, ref, "preprocess").ok
    img = np.full((4, 4, 3), 100, np.uint8)
    assert compare("u8", img + 1, img, "image_u8").ok and not compare("u8", img + 2, img, "image_u8").ok
    assert compare("m", img + 1, img, "bf16_image_u8").ok  # mean rule


def test_compare_legacy_bit_logits_fraction_rule():
    """Legacy bit logits: worst element within 2**-9 of the scale AND >= 97 % within FP32_REL."""
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 10, 1000).astype(np.float64)
    scale = np.abs(ref).max()
    few = ref.copy()
    few[:20] += 0.5 * T.BF16_FLIP_REL * scale  # 2 % of the elements moved by a flip: allowed
    assert compare("bit_logits", few, ref, "bit_logits").ok
    many = ref.copy()
    many[:50] += 0.5 * T.BF16_FLIP_REL * scale  # 5 %: the stated fraction is violated
    c = compare("bit_logits", many, ref, "bit_logits")
    assert not c.ok and "95.00% within" in c.note
    worst = ref.copy()
    worst[0] += 2 * T.BF16_FLIP_REL * scale
    assert not compare("bit_logits", worst, ref, "bit_logits").ok


def _stats(dist: np.ndarray, ref: np.ndarray) -> dict:
    st = {"max_abs": float(dist.max()), "scale": float(np.abs(ref).max())}
    for q in (50, 90, 99, 99.9):
        st[f"q{q:g}".replace(".", "_")] = float(np.percentile(dist, q))
    return st


def test_measured_rule_worst_and_fractions():
    rng = np.random.default_rng(1)
    ref = rng.normal(0, 2, 20000)
    own = np.abs(rng.normal(0, 1e-4, ref.size))  # the reference's own rounding distance (above the floor)
    st = _stats(own, ref)
    got = ref + rng.normal(0, 1e-4, ref.size)  # a port with the same rounding: passes
    assert measured("x", got, ref, st).ok
    worst = got.copy()
    worst[123] += 10 * st["max_abs"]  # one element beyond K x the worst
    c = measured("x", worst, ref, st)
    assert not c.ok and c.max_abs_err > c.bound
    bulk = ref + rng.normal(0, 1e-3, ref.size)  # everything 10x noisier, the worst element clipped: the fractions fail
    bulk = np.clip(bulk, ref - T.K_ROUND * st["max_abs"] * 0.99, ref + T.K_ROUND * st["max_abs"] * 0.99)
    c = measured("x", bulk, ref, st)
    assert not c.ok and "beyond" in c.note, c
    assert not measured("x", got[:-1], ref, st).ok  # shape
    nan = got.copy()
    nan[0] = np.nan
    assert not measured("x", nan, ref, st).ok


def test_measured_rule_floor_when_the_reference_was_exact():
    ref = np.linspace(-1, 1, 100)
    st = _stats(np.zeros(100), ref)  # the rerun saw no rounding at all
    assert measured("x", ref + 0.5 * T.FLOOR_REL, ref, st).ok
    assert not measured("x", ref + 2 * T.FLOOR_REL, ref, st).ok


def test_measured_rule_bf16_flip_allowance_only_for_bit_logits():
    """A bf16 rounding flip moves one token row of the bit logits by up to 2**-9 of the scale."""
    rng = np.random.default_rng(2)
    ref = rng.normal(0, 5, (1, 8, 64))
    own = np.abs(rng.normal(0, 1e-6, ref.shape))
    st = _stats(own, ref)
    scale = np.abs(ref).max()
    flipped = ref + rng.normal(0, 1e-6, ref.shape)
    flipped[0, 3] += 0.5 * T.BF16_FLIP_REL * scale  # one whole token row
    flipped[0, 5, :10] += 0.3 * T.BF16_FLIP_REL * scale  # part of a second
    assert measured("gen.s2.bit_logits_cfg", flipped, ref, st, flips=True).ok
    assert not measured("gen.s2.llm_out_cond", flipped, ref, st).ok  # no such allowance elsewhere
    three = flipped.copy()
    three[0, 6] += 0.5 * T.BF16_FLIP_REL * scale  # a third flipped row in an 8-token scale: too many
    assert not measured("gen.s2.bit_logits_cfg", three, ref, st, flips=True).ok


# ------------------------------------------------------------------------------------------ near-ties
def test_bits_check_near_tie_rule():
    rng = np.random.default_rng(3)
    margins = rng.normal(0, 1, 10000)
    margins[:5] = [1e-4, -2e-4, 3e-4, 5e-5, -1e-4]  # five near-ties
    ref = (margins > 0).astype(np.uint8)
    assert bits_check("b", ref, ref, margins, 1e-3).ok
    tie_flip = ref.copy()
    tie_flip[1] ^= 1  # a near-tie decided the other way: allowed
    c = bits_check("b", tie_flip, ref, margins, 1e-3)
    assert c.ok and c.note.startswith("1 of 10000 bits differ")
    confident = ref.copy()
    confident[np.argmax(np.abs(margins))] ^= 1  # the most confident bit flipped: a bug
    c = bits_check("b", confident, ref, margins, 1e-3)
    assert not c.ok and c.max_abs_err == 1
    # the same flip is acceptable only when the port's quantity really is that far off
    explained = np.zeros_like(margins)
    explained[np.argmax(np.abs(margins))] = 2 * np.abs(margins).max()
    assert bits_check("b", confident, ref, margins, 1e-3, explained=explained).ok
    # counted limit: too many bits within the near-tie margin leaves the bits untested
    assert not bits_check("b", ref, ref, margins, 0.5, max_tie_frac=0.02).ok
    assert bits_check("b", ref, ref, margins, 0.5, max_tie_frac=0.5).ok
    assert not bits_check("b", ref[:-1], ref, margins, 1e-3).ok


def test_bits_agree_where_confident_uses_the_port_argmax():
    rng = np.random.default_rng(4)
    ref_logits = rng.normal(0, 3, (1, 100, 64))
    pairs = ref_logits.reshape(-1, 2)
    ref_bits = (pairs[:, 1] > pairs[:, 0]).astype(np.uint8)
    assert bits_agree_where_confident("b", ref_logits, ref_logits, ref_bits, logit_bound=1e-3).ok
    i = int(np.argmax(np.abs(pairs[:, 1] - pairs[:, 0])))
    bad = ref_bits.copy()
    bad[i] ^= 1  # a reference bit that contradicts a confident pair
    assert not bits_agree_where_confident("b", ref_logits, ref_logits, bad, logit_bound=1e-3).ok
    j = int(np.argmin(np.abs(pairs[:, 1] - pairs[:, 0])))
    nudged = pairs.copy()
    nudged[j] += np.array([1, -1]) * np.sign(pairs[j, 1] - pairs[j, 0]) * 0.51 * abs(pairs[j, 1] - pairs[j, 0])
    c = bits_agree_where_confident("b", nudged.reshape(ref_logits.shape), ref_logits, ref_bits,
                                   logit_bound=abs(pairs[j, 1] - pairs[j, 0]))
    assert c.ok and c.note.startswith("1 of 3200 bits differ"), c


# ------------------------------------------------------------------------------------------ mutations
@pytest.fixture(scope="module")
def port():
    from vargpt_mlx.loading import load_model

    return load_model(CKPT)


@pytest.fixture(scope="module")
def bundle():
    return Bundle(REFS)


def _mutated(bundle: Bundle, changes: dict, drop: tuple = ()) -> Bundle:
    b = copy.copy(bundle)
    b.outputs, b.inputs = dict(bundle.outputs), dict(bundle.inputs)
    for name in drop:  # references the test does not need (skips their slow checks)
        b.outputs.pop(name, None)
    for name, fn in changes.items():
        arr = fn(np.array(bundle.outputs[name]))
        b.outputs[name] = b.inputs[name] = arr
    return b


def _bump(arr: np.ndarray) -> np.ndarray:
    """One element moved by 1 % of the tensor's scale (integers: by one; image pixels: by 8 levels)."""
    flat = arr.reshape(-1).copy()
    i = flat.size // 3
    if arr.dtype == np.uint8:  # an image: a pixel off by 8 grey levels
        flat[i] = flat[i] + 8 if flat[i] < 200 else flat[i] - 8
    elif np.issubdtype(arr.dtype, np.integer):
        flat[i] = flat[i] + 1 if flat[i] < np.iinfo(arr.dtype).max else flat[i] - 1
    else:
        flat[i] += np.float32(0.01 * max(float(np.abs(arr).max()), 1.0))
    return flat.reshape(arr.shape)


def _flip_confident_bit(margins: np.ndarray):
    def fn(bits: np.ndarray) -> np.ndarray:
        flat = bits.reshape(-1).copy()
        i = int(np.argmax(np.abs(margins).reshape(-1)))
        flat[i] ^= 1
        return flat.reshape(bits.shape)
    return fn


MUTATIONS = {
    "preprocess": ["und.pixel_values", "pre.pixel_values", "und.image_grid_thw"],
    "vision": ["und.vision_embeds"],
    "positions": ["und.position_ids", "und.rope_deltas", "txt.position_ids"],
    "logits": ["und.logits_mrope", "und.logits_plainpos", "txt.logits"],
    "greedy": ["txt.gen_step_logits", "und.gen_step_logits"],
    "generation": ["gen.ca_src_hidden", "gen.ca_kv_cond", "gen.cond_BD", "gen.cond_BD_or_gss", "gen.sos_stage",
                   "gen.s3.llm_in_cond", "gen.s3.llm_in_uncond", "gen.s3.llm_pos_cond", "gen.s4.llm_out_cond",
                   "gen.s4.llm_out_uncond", "gen.s5.inf_in", "gen.s5.bit_logits_raw", "gen.s6.bit_logits_cfg",
                   "gen.s2.next_in_codes", "gen.s2.proj_in_out", "gen.summed_codes", "gen.decoded",
                   "gen.image_rgb_u8", "gen.sequences"],
    "vae": ["vae.decode_out", "vae.raw_features", "vae.bsc_x_BLC_wo_prefix", "vae.bsc_summed_codes", "vae.bsc_recon"],
    "sft": ["sft_t2i.loss_total", "sft_t2i.loss_text_ce", "sft_t2i.loss_bits_mean", "sft_t2i.loss_bits_weighted",
            "sft_t2i.image_gen_logits", "sft_t2i.text_logits_nonpad", "sft_und.loss_plainpos", "sft_und.loss_mrope"],
}


def _results(port, b: Bundle, family: str) -> dict:
    v = Verifier(port, b, "fp32", use_stats=True)
    return {c.name: c for c in getattr(v, family)()}


@pytest.mark.parametrize("family", list(MUTATIONS))
def test_one_perturbed_element_per_tensor_fails(port, bundle, family):
    """Every tensor of every family: one element moved by 1 % of its scale (an integer by one) makes
    its check fail (the tensors of a family are perturbed together: their checks are independent)."""
    names = [n for n in MUTATIONS[family] if n in bundle.outputs]
    assert names
    got = _results(port, _mutated(bundle, {n: _bump for n in names}), family)
    passed = [n for n in names if got[n].ok]
    assert not passed, [got[n] for n in passed]


def test_perturbed_greedy_token_fails(port, bundle):
    def change_last(seq):
        s = seq.copy()
        s[0, -1] = (s[0, -1] + 1) % 1000
        return s
    got = _results(port, _mutated(bundle, {"txt.gen_sequences": change_last, "und.gen_sequences": change_last}),
                   "greedy")
    assert not got["txt.gen_sequences"].ok and not got["und.gen_sequences"].ok


def test_flipped_confident_generation_bit_fails(port, bundle):
    lg = bundle.outputs["gen.s5.bit_logits_cfg"].reshape(-1, 2)
    got = _results(port, _mutated(bundle, {"gen.s5.bits": _flip_confident_bit(lg[:, 1] - lg[:, 0])}), "generation")
    assert not got["gen.s5.bits"].ok and "differ with margin" in got["gen.s5.bits"].note
    assert not got["gen.free_running"].ok  # the free run reaches scale 5 with the teacher's context


def test_flipped_confident_vae_bit_fails(port, bundle):
    import mlx.core as mx

    from vargpt_mlx.verify import _schedule

    v = Verifier(port, bundle, "fp32")
    feats = v._features()
    _, _, _, residuals = v._given_ref_bits(feats, _schedule(bundle.info["vae"]), bundle.outputs["vae.bsc_gt_BL"])
    margins = np.concatenate([np.array(r.astype(mx.float32)).reshape(1, -1, r.shape[-1]) for r in residuals], 1)
    flip = _flip_confident_bit(margins)
    got = _results(port, _mutated(bundle, {"vae.bsc_gt_BL": flip}, drop=("vae.decode_out", "vae.bsc_recon")), "vae")
    assert not got["vae.bsc_gt_BL"].ok
    got = _results(port, _mutated(bundle, {"sft_t2i.gt_BL": flip}), "sft")
    assert not got["sft_t2i.gt_BL"].ok


def _flip_least_confident_bit(margins: np.ndarray):
    def fn(bits: np.ndarray) -> np.ndarray:
        flat = bits.reshape(-1).copy()
        flat[int(np.argmin(np.abs(margins).reshape(-1)))] ^= 1
        return flat.reshape(bits.shape)
    return fn


def test_reference_near_tie_decided_the_other_way_passes(port, bundle):
    """The issue's case: the reference decided a near-tie (bit 1.2e-5 from its threshold) the other
    way. The bit check accepts it. (The tie is taken in the last scale: a reference whose earlier
    tie went the other way would also have later bits that follow it, which a mutation cannot make.)"""
    import mlx.core as mx

    from vargpt_mlx.verify import _schedule

    v = Verifier(port, bundle, "fp32")
    _, _, _, residuals = v._given_ref_bits(v._features(), _schedule(bundle.info["vae"]), bundle.outputs["vae.bsc_gt_BL"])
    margins = np.concatenate([np.array(r.astype(mx.float32)).reshape(1, -1, r.shape[-1]) for r in residuals], 1)
    last = np.array(residuals[-1].astype(mx.float32)).size
    margins[:, :-last // margins.shape[-1]] = np.inf  # only the last scale
    flip = _flip_least_confident_bit(margins)
    got = _results(port, _mutated(bundle, {"vae.bsc_gt_BL": flip}, drop=("vae.decode_out", "vae.bsc_recon")), "vae")
    assert got["vae.bsc_gt_BL"].ok and got["vae.bsc_gt_BL"].note.split("; ")[1].startswith("1 of"), got["vae.bsc_gt_BL"]
    lg = bundle.outputs["gen.s6.bit_logits_cfg"].reshape(-1, 2)
    got = _results(port, _mutated(bundle, {"gen.s6.bits": _flip_least_confident_bit(lg[:, 1] - lg[:, 0])}), "generation")
    assert got["gen.s6.bits"].ok and got["gen.s6.bits"].note.startswith("1 of 8192 bits differ"), got["gen.s6.bits"]
    assert got["gen.free_running"].ok  # a flip at a reference near-tie ends the free-running comparison there


# ---------------------------------------------------------------- the condition's bf16 ties
def _pool_tie_model(j: int):
    """The fixture model with ``v_bias[j]`` moved so that the cond row's v lands on a bfloat16
    rounding midpoint (a tie), and the pieces the tests need: (model, v of both rows, rows(out))."""
    import mlx.core as mx

    from vargpt_mlx.loading import load_model
    from vargpt_mlx.models.infinity import CrossMemory

    m = load_model(CKPT)
    inf = m.vargpt_gen
    ca = inf.text_proj_for_sos.ca

    def v_rows():
        _, v = ca.keys_values(CrossMemory(inf.text_norm(m.sos_rows())[:, None]))
        return np.array(v.transpose(0, 2, 1, 3).reshape(2, -1))

    v = v_rows()
    mid = ((v.view(np.uint32) & np.uint32(0xFFFF0000)) | np.uint32(0x8000)).view(np.float32)
    bias = np.array(ca.v_bias)
    bias[j] += mid[0, j] - v[0, j]
    ca.v_bias = mx.array(bias)

    def rows(out):
        return np.array(ca.proj(mx.array(out).reshape(2, 1, -1))[:, 0])

    return m, v_rows(), rows


def _bf16_neighbours(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low = (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    return low, (low.view(np.uint32) + np.uint32(0x10000)).view(np.float32)


def test_pool_tie_rounded_the_other_way_is_resolved(bundle):
    """The CI case (VARGPT_LIVE_SEED=296672): the reference rounded one of text_proj_for_sos's v
    values, within a float32 error of a bf16 midpoint, to the other neighbour, which moves its whole
    cond_BD row by ~1e-3. The verifier rounds that tie as the reference did, and every check sees
    the resolved rows through ``Infinity.condition`` while it runs (and only then)."""
    import mlx.core as mx

    from vargpt_mlx.verify import _condition_rows

    j = 5
    m, v, rows = _pool_tie_model(j)
    low, high = _bf16_neighbours(v)
    port_round = np.array(mx.array(v).astype(mx.bfloat16).astype(mx.float32))
    ref_out = port_round.copy()
    ref_out[0, j] = high[0, j] if port_round[0, j] == low[0, j] else low[0, j]
    ref = rows(ref_out)
    own = np.array(m.vargpt_gen.condition(m.sos_rows()))
    assert np.abs(own - ref).max() > 1e-4  # what the CI run saw: the whole row off, far beyond float32 noise
    verifier = Verifier(m, _mutated(bundle, {"gen.cond_BD": lambda a: ref.reshape(a.shape)}), "fp32")
    pool = verifier.pool_rounding()
    assert pool.ok and "1 rounded the other way" in pool.note and f"(0, {j})" in pool.note, pool.note
    assert np.array_equal(np.array(pool.rows_out), ref)
    assert verifier.cmp("gen.cond_BD", pool.rows_out).ok
    with _condition_rows(m.vargpt_gen, pool):
        assert np.array_equal(np.array(m.vargpt_gen.condition(m.sos_rows())), ref)
        # training's sos row alone (training/losses.py) gets the resolved cond row too
        assert np.array_equal(np.array(m.vargpt_gen.condition(m.sos_embedding(mx.array([0])))), ref[:1])
    assert np.array_equal(np.array(m.vargpt_gen.condition(m.sos_rows())), own)


def test_pool_rounding_away_from_a_tie_fails(bundle):
    """The same flip at the element farthest from a bf16 midpoint is no tie: it is not resolved, and
    gen.cond_BD fails."""
    import mlx.core as mx

    m, v, rows = _pool_tie_model(5)
    low, high = _bf16_neighbours(v)
    mid = ((v.view(np.uint32) & np.uint32(0xFFFF0000)) | np.uint32(0x8000)).view(np.float32)
    far = int(np.argmax(np.abs(v[0] - mid[0]) / np.spacing(np.abs(v[0]))))
    port_round = np.array(mx.array(v).astype(mx.bfloat16).astype(mx.float32))
    ref_out = port_round.copy()
    ref_out[0, far] = high[0, far] if port_round[0, far] == low[0, far] else low[0, far]
    verifier = Verifier(m, _mutated(bundle, {"gen.cond_BD": lambda a: rows(ref_out).reshape(a.shape)}), "fp32")
    pool = verifier.pool_rounding()
    assert "0 rounded the other way" in pool.note, pool.note
    assert not verifier.cmp("gen.cond_BD", pool.rows_out).ok


def test_pool_ties_not_resolved_for_a_bf16_reference(bundle, monkeypatch):
    """A reference computed in bf16 carries bf16 arithmetic error in v at every element, so the tie
    rule (and its MAX_POOL_FLIPS, derived from float32 noise) does not apply: the plain bf16 check
    decides (live bf16 config, VARGPT_LIVE_SEED=196483: 4 'flips' wanted, 0.25 of the bf16 bound)."""
    m, _, _ = _pool_tie_model(5)
    verifier = Verifier(m, bundle, "fp32")
    assert verifier.pool_rounding() is not None
    monkeypatch.setattr(verifier.b, "ref_dtype", "bfloat16")  # undone after the test: the bundle is shared
    assert verifier.pool_rounding() is None


def test_verify_public_bundle_with_decoding_matrix_vector_path(monkeypatch):
    """The fixture's layers are below ``models.linear.MIN_BYTES``, so the default run above keeps
    MLX's matmul: with the threshold at 0, every decoding step (greedy, repetition penalty, chat
    templates) takes the numpy matrix-vector path the real model's decoding takes, and every
    check still passes."""
    from vargpt_mlx.models import linear

    monkeypatch.setattr(linear, "MIN_BYTES", 0)
    failed = [c for _, c in verify(CKPT, REFS) if not c.ok]
    assert not failed, failed
