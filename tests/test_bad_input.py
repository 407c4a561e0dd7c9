"""Bad input to ``generate``, ``edit`` (and ``chat`` when present) through the CLI on the fixture model.

Every user mistake must give exit code 2 and exactly one ``error: ...`` line on stderr, no
traceback (``--debug`` re-raises). Odd but valid images (RGBA, greyscale, palette, 16-bit, CMYK,
EXIF-rotated, huge) must work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vargpt_mlx.cli.main import app
from tests.test_generate import INPUT_IMAGE



def run(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def assert_user_error(r, *fragments):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:"), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in r.output


@pytest.fixture
def fast_vae(monkeypatch):
    """Skip the VAE (a second per image on CPU): these tests are about inputs, not pixels."""
    from vargpt_mlx.models.vae import BSQVAE

    monkeypatch.setattr(BSQVAE, "decode", lambda self, z: mx.zeros((z.shape[0], 16 * z.shape[1], 16 * z.shape[2], 3)))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network, empty Hugging Face cache (env for a fresh import, constants if already imported)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


# Each command with the arguments that make it valid apart from what a test breaks.
def gen_args(model, out, prompt="a red cat"):
    return ["generate", prompt, "--model", model, "-o", out, "--seed", 1]


def edit_args(model, out, prompt="make it blue", image=INPUT_IMAGE):
    return ["edit", prompt, "--image", image, "--model", model, "-o", out, "--seed", 1]


COMMANDS = {"generate": gen_args, "edit": edit_args}


# ------------------------------------------------------------------------------------- prompts / model
@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(cmd, prompt, model_dir, tmp_path):
    assert_user_error(run(*COMMANDS[cmd](model_dir, tmp_path / "o.png", prompt=prompt)), "empty prompt")


def test_edit_prompt_of_only_the_image_marker_is_empty(model_dir, tmp_path):
    assert_user_error(run(*edit_args(model_dir, tmp_path / "o.png", prompt=" <image> ")), "empty prompt")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_no_model(cmd, tmp_path, monkeypatch):
    monkeypatch.delenv("VARGPT_MODEL", raising=False)
    args = [a for a in COMMANDS[cmd]("X", tmp_path / "o.png") if a not in ("--model", "X")]
    assert_user_error(run(*args), "no model given")


def test_model_from_environment(model_dir, tmp_path, monkeypatch, fast_vae):
    monkeypatch.setenv("VARGPT_MODEL", str(model_dir))
    r = run("generate", "a red cat", "-o", tmp_path / "o.png", "--seed", 1)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_unknown_model_path(cmd, tmp_path):
    assert_user_error(run(*COMMANDS[cmd](tmp_path / "nowhere", tmp_path / "o.png")), "does not exist")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_unknown_repo_id_offline(cmd, tmp_path, offline_hub):
    r = run(*COMMANDS[cmd]("nobody-xyz/no-such-vargpt", tmp_path / "o.png"))
    assert_user_error(r, "nobody-xyz/no-such-vargpt")
    assert "cache" in r.stderr or "offline" in r.stderr


@pytest.mark.parametrize("cmd", COMMANDS)
def test_directory_that_is_not_a_checkpoint(cmd, tmp_path):
    d = tmp_path / "not_a_model"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    assert_user_error(run(*COMMANDS[cmd](d, tmp_path / "o.png")), "not a VARGPT checkpoint")


def test_checkpoint_without_tokenizer(tmp_path):
    from tests.conftest import CKPT

    assert_user_error(run(*gen_args(CKPT, tmp_path / "o.png")), "tokenizer")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_missing_adapter_path(cmd, model_dir, tmp_path):
    r = run(*COMMANDS[cmd](model_dir, tmp_path / "o.png"), "--adapter-path", tmp_path / "no_adapters")
    assert_user_error(r, "adapter path", "does not exist")


# ------------------------------------------------------------------------------------- output path
@pytest.mark.parametrize("cmd", COMMANDS)
def test_output_directory_missing(cmd, model_dir, tmp_path):
    r = run(*COMMANDS[cmd](model_dir, tmp_path / "missing" / "o.png"))
    assert_user_error(r, "output directory", "does not exist")
    assert not (tmp_path / "missing").exists()  # parents are not created


@pytest.mark.parametrize("cmd", COMMANDS)
def test_output_parent_is_a_file(cmd, model_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_user_error(run(*COMMANDS[cmd](model_dir, tmp_path / "file" / "o.png")), "not a directory")


def test_output_is_a_directory_or_not_png(model_dir, tmp_path):
    (tmp_path / "d.png").mkdir()
    assert_user_error(run(*gen_args(model_dir, tmp_path / "d.png")), "is a directory")
    assert_user_error(run(*gen_args(model_dir, tmp_path / "o.jpg")), ".png")


def test_output_directory_not_writable(model_dir, tmp_path):
    """In a real subprocess, and holding for root (which ignores modes): /proc, an immutable directory."""
    from tests.test_cli_contract import _immutable_dir, assert_user_error as assert_contract, cli

    places = [Path("/proc")]
    immutable = _immutable_dir(tmp_path)
    if immutable is not None:
        places.append(immutable)
    elif os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        places.append(tmp_path / "ro")
    try:
        for d in places:
            r = cli(gen_args(model_dir, d / "o.png"), tmp_path)
            assert_contract(r, "cannot write", str(d))
    finally:
        if immutable is not None:
            import subprocess

            subprocess.run(["chattr", "-i", str(immutable)], capture_output=True)


def test_output_checked_before_the_model_is_loaded(tmp_path):
    """A bad output path fails at once, even with a model path that would fail later."""
    assert_user_error(run(*gen_args(tmp_path / "nowhere", tmp_path / "missing" / "o.png")), "output directory")


# ------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("aspect", ["wide", "16x9", "0:9", "-4:3", "4:0", "100:1", ":"])
def test_bad_aspect(cmd, aspect, model_dir, tmp_path):
    assert_user_error(run(*COMMANDS[cmd](model_dir, tmp_path / "o.png"), "--aspect", aspect), "aspect")


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("pn", ["0.3M", "big", "M", "-1M"])
def test_bad_pn(cmd, pn, model_dir, tmp_path):
    assert_user_error(run(*COMMANDS[cmd](model_dir, tmp_path / "o.png"), "--pn", pn), "pn")


@pytest.mark.parametrize("opt,value,what", [("--n", 0, "--n"), ("--tau", 0, "tau"), ("--top-p", 1.5, "top_p"),
                                            ("--top-k", -1, "top_k"), ("--seed", -3, "seed"),
                                            ("--batch-size", 0, "--batch-size"), ("--cfg", "nan", "cfg")])
def test_bad_numbers(opt, value, what, model_dir, tmp_path):
    assert_user_error(run(*gen_args(model_dir, tmp_path / "o.png"), opt, value), what)


def test_debug_shows_the_traceback(model_dir, tmp_path):
    r = run("--debug", *gen_args(model_dir, tmp_path / "o.png"), "--aspect", "wide")
    assert r.exit_code != 0 and isinstance(r.exception, ValueError)


# ------------------------------------------------------------------------------------- input images
def _truncated(path: Path) -> Path:
    data = INPUT_IMAGE.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_IMAGES = {
    "missing": (lambda d: d / "nope.png", "not found"),
    "directory": (lambda d: d, "not found"),
    "corrupt": (lambda d: (d / "corrupt.png").write_bytes(os.urandom(500)) and d / "corrupt.png", "cannot read image"),
    "not_an_image": (lambda d: (d / "text.png").write_text("hello") and d / "text.png", "cannot read image"),
    "truncated": (lambda d: _truncated(d / "trunc.png"), "cannot read image"),
    "empty_file": (lambda d: (d / "empty.png").write_bytes(b"") or d / "empty.png", "cannot read image"),
    "too_small": (lambda d: Image.new("RGB", (20, 60)).save(d / "small.png") or d / "small.png", "too small"),
    "extreme_aspect": (lambda d: Image.new("RGB", (28 * 210, 28)).save(d / "thin.png") or d / "thin.png",
                       "aspect ratio"),
}


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_edit_bad_image(kind, model_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make, message = BAD_IMAGES[kind]
    path = make(src)
    assert_user_error(run(*edit_args(model_dir, tmp_path / "o.png", image=path)), message)


def test_edit_unreadable_image(model_dir, tmp_path):
    """In a real subprocess, and holding for root: /proc/self/mem is a file no one can read from 0."""
    from tests.test_cli_contract import assert_user_error as assert_contract, cli

    r = cli(edit_args(model_dir, tmp_path / "o.png", image="/proc/self/mem"), tmp_path)
    assert_contract(r, "cannot read image")
    assert not (tmp_path / "o.png").exists()


def _exif_rotated(path: Path) -> Path:
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 40, 3), dtype=np.uint8))  # 40 wide, 80 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(path, format="JPEG", exif=exif)
    return path


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


GOOD_IMAGES = {
    "rgba": (lambda d: _save(Image.new("RGBA", (64, 48), (255, 0, 0, 128)), d / "rgba.png"), "64x48"),
    "grayscale": (lambda d: _save(Image.new("L", (64, 48), 128), d / "gray.png"), "64x48"),
    "palette": (lambda d: _save(Image.new("RGB", (64, 48), (0, 99, 200)).convert("P"), d / "pal.png"), "64x48"),
    "16bit": (lambda d: _save(Image.fromarray(np.full((48, 64), 40000, np.uint16)), d / "deep.png"), "64x48"),
    "cmyk": (lambda d: _save(Image.new("CMYK", (64, 48), (0, 50, 100, 0)), d / "cmyk.jpg", format="JPEG"), "64x48"),
    "exif_rotated": (lambda d: _exif_rotated(d / "rot.jpg"), "80x40"),
    "huge": (lambda d: _save(Image.new("RGB", (3000, 2000), (10, 200, 30)), d / "huge.png"), "627x418"),
}


@pytest.mark.parametrize("kind", GOOD_IMAGES)
def test_edit_odd_but_valid_images_work(kind, model_dir, tmp_path, fast_vae):
    src = tmp_path / "src"
    src.mkdir()
    make, size = GOOD_IMAGES[kind]
    out = tmp_path / "o.png"
    r = run(*edit_args(model_dir, out, image=make(src)))
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.size == (256, 256)
        assert im.text["input_size"] == size  # EXIF applied; huge images capped at 512*512 pixels
        assert int(im.text["input_image_tokens"]) <= 512 * 512 // (28 * 28)


def test_16bit_image_is_scaled_not_clipped():
    from vargpt_mlx.api import prepare_edit_image

    deep = Image.fromarray(np.full((48, 64), 32768, np.uint16))
    assert np.asarray(prepare_edit_image(deep))[0, 0].tolist() == [128, 128, 128]


def test_edit_prompt_too_long_for_generation(model_dir, tmp_path):
    prompt = " ".join(["draw a very long and detailed picture"] * 120)
    assert_user_error(run(*edit_args(model_dir, tmp_path / "o.png", prompt=prompt)), "at most 512")


def test_edit_without_image_option(model_dir, tmp_path):
    r = run("edit", "make it blue", "--model", model_dir, "-o", tmp_path / "o.png")
    assert r.exit_code == 2 and "--image" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------------- chat (other helper's command)
@pytest.mark.parametrize("case", ["missing_image", "corrupt_image", "empty_prompt", "unknown_model"])
def test_chat_bad_input(case, model_dir, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(os.urandom(300))
    args = {
        "missing_image": ["chat", "hi", "--model", model_dir, "--image", tmp_path / "nope.png"],
        "corrupt_image": ["chat", "hi", "--model", model_dir, "--image", corrupt],
        "empty_prompt": ["chat", "  ", "--model", model_dir],
        "unknown_model": ["chat", "hi", "--model", tmp_path / "nowhere"],
    }[case]
    assert_user_error(run(*args))
