"""``vargpt-mlx generate`` / ``edit`` and the Python API (``vargpt_mlx.api``) on the tiny fixture model.

Weights are random, so images are noise: the tests check sizes, files, metadata, determinism by
seed, equality between the batched and the one-image paths, and that n images share one prefill.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vargpt_mlx.cli.main import app
from tests.conftest import FIXTURES
from vargpt_mlx import api, schedules
from vargpt_mlx.pipelines import image_generation as ig

TOKENIZER = Path(__file__).parent / "fixtures" / "tiny_tokenizer"
INPUT_IMAGE = FIXTURES / "und_image_56x84.png"


@pytest.fixture(scope="module")
def pipe(model_dir):
    return api.load(model_dir)


@pytest.fixture
def cheap_vae(monkeypatch):
    """A stand-in VAE decoder that still depends on the codes (so on the seed): the real one takes
    1-7 s per image on a CPU and is checked against upstream by tests/test_verify.py."""
    from vargpt_mlx.models.vae import BSQVAE

    def decode(self, z):
        x = mx.repeat(mx.repeat(z[..., :3] * 4.0, 16, axis=1), 16, axis=2)
        return mx.clip(x, -1.0, 1.0)

    monkeypatch.setattr(BSQVAE, "decode", decode)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ------------------------------------------------------------------------------------- CLI
def test_cli_generate_writes_png_with_metadata(model_dir, tmp_path):
    out = tmp_path / "cat.png"
    r = run("generate", "a red cat", "--model", model_dir, "-o", out, "--seed", 7)
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (256, 256) and im.mode == "RGB"
        text = dict(im.text)
    assert text["prompt"] == "a red cat" and text["seed"] == "7" and text["mode"] == "text-to-image"
    assert (text["cfg"], text["tau"], text["top_k"], text["top_p"]) == ("3.0", "0.5", "900", "0.97")
    assert (text["pn"], text["aspect"], text["width"], text["height"]) == ("0.06M", "1:1", "256", "256")
    assert '"seed": 7' in text["parameters"]
    # the command prints the prompt, seed and settings
    for s in ("a red cat", "seed 7", "cfg 3", "tau 0.5", "top_k 900", "top_p 0.97", "256x256", "0.06M"):
        assert s in r.stdout, s
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_cli_seed_reproduces_png_bytes_and_n_names_files(model_dir, tmp_path, cheap_vae):
    a, c, b = tmp_path / "a.png", tmp_path / "c.png", tmp_path / "b.png"
    assert run("generate", "a red cat", "--model", model_dir, "-o", a, "--seed", 11).exit_code == 0
    assert run("generate", "a red cat", "--model", model_dir, "-o", c, "--seed", 11).exit_code == 0
    assert a.read_bytes() == c.read_bytes()  # same seed => identical PNG bytes
    r = run("generate", "a red cat", "--model", model_dir, "-o", b, "--seed", 10, "--n", 2)
    assert r.exit_code == 0, r.output
    assert not b.exists()
    b0, b1 = tmp_path / "b_0.png", tmp_path / "b_1.png"
    assert "b_0.png" in r.stdout and "b_1.png" in r.stdout
    # image 1 of a batch with seed 10 is the image of seed 11; image 0 (seed 10) differs
    assert np.array_equal(pixels(a), pixels(b1))
    assert not np.array_equal(pixels(b0), pixels(b1))
    with Image.open(b0) as i0, Image.open(b1) as i1:
        assert (i0.text["seed"], i1.text["seed"]) == ("10", "11")
        assert (i0.text["index"], i1.text["index"], i1.text["n"]) == ("0", "1", "2")


def test_cli_aspect_gives_the_schedule_size(model_dir, tmp_path, cheap_vae):
    out = tmp_path / "wide.png"
    r = run("generate", "a red cat", "--model", model_dir, "-o", out, "--seed", 1, "--aspect", "4:3")
    assert r.exit_code == 0, r.output
    h, w = schedules.image_size(schedules.get_schedule("0.06M", 0.75))
    assert (w, h) == (320, 240)  # last scale (15, 20) x 16
    with Image.open(out) as im:
        assert im.size == (320, 240)
        assert im.text["aspect"] == "4:3"


def test_cli_edit_writes_png(model_dir, tmp_path):
    out = tmp_path / "edited.png"
    r = run("edit", "Transform this image <image> into a painting", "--image", INPUT_IMAGE,
            "--model", model_dir, "-o", out, "--seed", 3)
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.size == (256, 256)
        assert im.text["mode"] == "edit" and im.text["input_image"] == str(INPUT_IMAGE)
        assert im.text["input_size"] == "84x56" and im.text["input_image_tokens"] == "6"
        assert im.text["assistant_prefix"] == "The output image is: "


def test_cli_adapter_path(model_dir, tmp_path, cheap_vae):
    lora = pytest.importorskip("vargpt_mlx.training.lora")
    model = api.load(model_dir).model
    cfg = lora.apply_lora(model, lora.LoraConfig(rank=2, num_layers=-1, targets=("llm", "infinity")))
    for _, layer in lora.lora_layers(model):
        layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(1)) * 0.5
    lora.save_adapters(model, tmp_path / "adapters", cfg)
    base, tuned = tmp_path / "base.png", tmp_path / "tuned.png"
    assert run("generate", "a red cat", "--model", model_dir, "-o", base, "--seed", 2).exit_code == 0
    r = run("generate", "a red cat", "--model", model_dir, "-o", tuned, "--seed", 2,
            "--adapter-path", tmp_path / "adapters")
    assert r.exit_code == 0, r.output
    with Image.open(tuned) as im:
        assert im.text["adapter_path"] == str(tmp_path / "adapters")
    assert not np.array_equal(pixels(base), pixels(tuned))


# ------------------------------------------------------------------------------------- API
def test_api_generate_returns_pil_images_with_metadata(pipe, cheap_vae):
    """PIL images with the metadata in ``.info``; a random seed is recorded and reproduces."""
    images = api.generate_image(pipe, "a blue bird", n=2)
    assert len(images) == 2 and all(isinstance(im, Image.Image) for im in images)
    assert [im.size for im in images] == [(256, 256)] * 2
    seed = int(images[0].info["seed"])
    assert images[1].info["seed"] == str(seed + 1) and images[0].info["prompt"] == "a blue bird"
    again = api.generate_image(pipe, "a blue bird", seed=seed + 1)[0]
    assert np.array_equal(np.asarray(images[1]), np.asarray(again))


def test_batch_equals_single_draws_and_seeds_differ(pipe, monkeypatch):
    """Image i of a batch == the one-image draw with seed + i, for any batch size (bits and codes
    compared exactly; the VAE is skipped)."""
    monkeypatch.setattr(pipe.model.vae_local, "decode", lambda z: mx.zeros((z.shape[0], 256, 256, 3)))
    ids = api.t2i_prompt_ids(pipe.tokenizer, "a blue bird")
    s = ig.GenerationSettings(seed=20)
    prefill = ig.prefill_prompt(pipe.model, ids)
    singles = [ig.draw_images(pipe.model, *prefill, ig.GenerationSettings(seed=20 + i))[0] for i in range(3)]
    grouped = ig.draw_images(pipe.model, *prefill, s, n=3, batch_size=2, decode=False)  # batches of 2 and 1
    for one, g in zip(singles, grouped):
        assert g.image is None
        for x, y in zip(one.bits, g.bits):
            assert mx.array_equal(x, y)
        assert mx.array_equal(one.summed_codes, g.summed_codes)
    assert not mx.array_equal(singles[0].summed_codes, singles[1].summed_codes)
    # argmax draws do not depend on the seed
    a0, a1 = ig.draw_images(pipe.model, *prefill, ig.GenerationSettings(seed=0, argmax=True), n=2, decode=False)
    assert mx.array_equal(a0.summed_codes, a1.summed_codes)


def test_api_accepts_a_path_and_edits(model_dir, cheap_vae):
    with Image.open(INPUT_IMAGE) as src:
        images = api.edit_image(str(model_dir), src.copy(), "make it blue", seed=1, aspect="3:4")
    assert len(images) == 1 and images[0].size == (240, 320)
    assert images[0].info["mode"] == "edit" and images[0].info["input_image"] == "<Image>"


def test_n_images_share_one_prefill(pipe, monkeypatch):
    """One prompt prefill for all n images, and each scale runs the LLM once per CFG branch for
    the whole batch (not once per image)."""
    from vargpt_mlx.models.qwen2 import Qwen2Model

    prefills, llm_calls = [], []
    real_prefill, real_call = ig.prefill_prompt, Qwen2Model.__call__

    def counting_prefill(*a, **k):
        prefills.append(1)
        return real_prefill(*a, **k)

    def counting_call(self, inputs_embeds, *a, **k):
        llm_calls.append(inputs_embeds.shape[0])
        return real_call(self, inputs_embeds, *a, **k)

    monkeypatch.setattr(ig, "prefill_prompt", counting_prefill)
    monkeypatch.setattr(Qwen2Model, "__call__", counting_call)
    monkeypatch.setattr(pipe.model.vae_local, "decode", lambda z: mx.zeros((z.shape[0], 256, 256, 3)))
    api.generate_image(pipe, "a blue bird", n=3, seed=1)
    n_scales = len(schedules.get_schedule("0.06M"))
    assert len(prefills) == 1
    assert llm_calls == [1] + [3] * (2 * n_scales)  # prefill, then cond + uncond per scale, batch 3


def test_repeat_cache_leaves_the_prefill_cache_alone(pipe):
    ids = api.t2i_prompt_ids(pipe.tokenizer, "a blue bird")
    cache, hidden = ig.prefill_prompt(pipe.model, ids)
    offset = cache[0].offset
    ig.draw_images(pipe.model, cache, hidden, ig.GenerationSettings(seed=1), n=2, decode=False)
    assert cache[0].offset == offset  # later draws can reuse the same prefill
    copies = ig.repeat_cache(cache, 3)
    assert copies[0].keys.shape[0] == 3 and copies[0].offset == offset


def test_bfloat16_model_draws_in_bfloat16(model_dir, monkeypatch):
    """A bfloat16 model (Metal's default, or ``--dtype bfloat16``) keeps its activations in bfloat16
    through the scale loop: KV caches in bfloat16 except Infinity's keys, which are float32 after its
    float32 RoPE as upstream's k cache is. (Infinity's cross-attention output and the next-scale
    codes in float32 had made every later scale float32, caches too: 1.4x their memory.)"""
    from vargpt_mlx.loading import load_model

    model = load_model(model_dir, dtype=mx.bfloat16)
    seen = {}
    real_repeat, real_make = ig.repeat_cache, model.vargpt_gen.make_cache
    monkeypatch.setattr(ig, "repeat_cache", lambda *a: seen.setdefault("llm", real_repeat(*a)))
    monkeypatch.setattr(model.vargpt_gen, "make_cache", lambda: seen.setdefault("inf", real_make()))
    tok = api.load(model_dir).tokenizer
    cache, hidden = ig.prefill_prompt(model, api.t2i_prompt_ids(tok, "a blue bird"))
    ig.draw_images(model, cache, hidden, ig.GenerationSettings(seed=0), n=1, decode=False)
    assert all(c.keys.dtype == c.values.dtype == mx.bfloat16 for c in list(cache) + seen["llm"])
    assert all(c.keys.dtype == mx.float32 and c.values.dtype == mx.bfloat16 for c in seen["inf"])


# ------------------------------------------------------------------------------------- prompts
def test_t2i_prompt_uses_the_chat_template(pipe):
    ids = api.t2i_prompt_ids(pipe.tokenizer, "a red cat")
    assert pipe.tokenizer.decode(list(ids)) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n")
    ids = api.t2i_prompt_ids(pipe.tokenizer, "a red cat", "I have designed a drawing of a red cat.")
    assert pipe.tokenizer.decode(list(ids)).endswith("assistant\nI have designed a drawing of a red cat.")


def test_edit_prompt_layout(pipe):
    tok, cfg = pipe.tokenizer, pipe.config
    text = tok.decode(list(api.edit_prompt_ids(tok, cfg, "Transform this image <image> into oil paint", 3)))
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "Transform this image <|vision_start|>" + "<|image_pad|>" * 3 + "<|vision_end|> into oil paint"
                    "<|im_end|>\n<|im_start|>assistant\nThe output image is: ")
    text = tok.decode(list(api.edit_prompt_ids(tok, cfg, "Make it blue", 2)))
    assert "user\nMake it blue<|vision_start|><|image_pad|><|image_pad|><|vision_end|><|im_end|>" in text
    with pytest.raises(ValueError, match="at most once"):
        api.edit_prompt_ids(tok, cfg, "<image> and <image>", 2)


def test_settings_validation_and_normalisation():
    assert api.normalize_pn("0.6m") == "0.60M" and api.normalize_pn("1") == "1M"
    assert api.check_aspect("16:9") == 0.571 and api.check_aspect("9:16") == 1.75 and api.check_aspect(1) == 1.0
    for bad in ("wide", "16x9", "0:9", "-4:3", "4:0", "100:1", "nan"):
        with pytest.raises(ValueError):
            api.check_aspect(bad)
    for kw in ({"tau": 0}, {"top_p": 1.5}, {"top_k": -1}, {"seed": -1}, {"pn": "0.3M"}):
        with pytest.raises(ValueError):
            api.make_settings(**kw)


def test_output_paths_and_atomic_save(tmp_path, monkeypatch):
    assert api.output_paths(tmp_path / "x.png", 1) == [tmp_path / "x.png"]
    assert api.output_paths(tmp_path / "x.png", 2) == [tmp_path / "x_0.png", tmp_path / "x_1.png"]
    im = Image.new("RGB", (8, 8))
    im.info["prompt"] = "ünïcode ok"
    api.save_image(im, tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as back:
        assert back.text["prompt"] == "ünïcode ok"

    def broken(self, fp, *a, **k):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError):
        api.save_image(im, tmp_path / "y.png")
    assert not (tmp_path / "y.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no temp litter
