"""The reference path's own pieces: size specs, the command line's one-line errors, and (with an
interpreter that has the ``[reference]`` extra) the flash_attn stand-in and random checkpoints.
End-to-end parity on fresh sizes is in ``test_reference_live.py``."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from vargpt_mlx.cli.main import app
from tests import reference_env as env
from tests.conftest import CKPT
from vargpt_mlx.reference import ReferenceError, check_upstream, reference_python
from vargpt_mlx.reference.sizes import PRESETS, SizeError, parse_sizes, sizes_from_arch

runner = CliRunner()


# ------------------------------------------------------------------------------------------ sizes
def test_size_presets_and_overrides():
    assert parse_sizes("tiny") == PRESETS["tiny"]
    s = parse_sizes("025m")
    assert (s.pn, s.vae_ch, s.vae_mult, s.llm_kv_heads) == ("0.25M", 32, (1, 2, 4, 4, 4), 1)
    s = parse_sizes("tiny,llm_dim=72,llm_heads=3,llm_kv_heads=1,mrope=2:5:5,vae_mult=1-2-3-3-3,pn=0.25M")
    assert (s.llm_dim, s.mrope, s.vae_mult, s.pn) == (72, (2, 5, 5), (1, 2, 3, 3, 3), "0.25M")
    assert parse_sizes("llm_kv_heads=4").llm_kv_heads == 4  # overrides on the tiny preset
    assert parse_sizes("real").token_ids()["image_gen_start_token_id"] == 151657
    assert parse_sizes("tiny").token_ids()["image_gen_start_token_id"] == 1014


@pytest.mark.parametrize("spec, words", [
    ("huge", "unknown size preset"), ("tiny,foo=1", "bad size item"), ("tiny,llm_dim=x", "bad value"),
    ("tiny,llm_dim=63", "llm_heads"), ("tiny,mrope=1:1:1", "mrope sections"), ("tiny,llm_kv_heads=3", "multiple"),
    ("tiny,inf_dim=192", "multiple of 128"), ("tiny,inf_chunks=1", "block_chunks"), ("tiny,vae_ch=20", "groups"),
    ("tiny,pn=2M", "pn must be"), ("tiny,vocab=1000", "vocab"), ("", "empty"),
])
def test_bad_size_specs(spec, words):
    with pytest.raises(SizeError, match=words):
        parse_sizes(spec)


def test_sizes_of_the_public_checkpoint_are_the_tiny_preset():
    cfg = json.loads((CKPT / "config.json").read_text())
    arch = json.loads((CKPT / "tiny_arch.json").read_text())
    assert sizes_from_arch(cfg, arch) == PRESETS["tiny"]
    real = sizes_from_arch(cfg, None)  # no sidecar: upstream's hard-coded Infinity-2B / VAE, pn 0.25M
    assert (real.inf_dim, real.vae_ch, real.pn) == (2048, 128, "0.25M")


# ------------------------------------------------------------------------------------------ errors
def test_missing_upstream_is_one_line_exit_2(tmp_path):
    for cmd in (["reference", "random", "--sizes", "tiny", "--out", str(tmp_path / "c")],
                ["reference", "record", "--model", str(CKPT), "--out", str(tmp_path / "r")]):
        r = runner.invoke(app, [*cmd, "--upstream", str(tmp_path / "nope")])
        assert r.exit_code == 2, r.output
        assert "upstream directory" in r.output and "does not exist" in r.output and "Traceback" not in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["reference", "random", "--upstream", str(tmp_path / "empty"), "--sizes", "tiny",
                            "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "does not hold the VARGPT-v1.1 code" in r.output
    with pytest.raises(ReferenceError):
        check_upstream(tmp_path / "empty")


def test_bad_arguments_are_one_line_exit_2(tmp_path):
    up = str(tmp_path)
    cases = [
        (["reference", "random", "--upstream", up, "--sizes", "tiny,llm_dim=63", "--out", str(tmp_path / "c")], "llm_heads"),
        (["reference", "random", "--upstream", up, "--sizes", "tiny", "--out", str(tmp_path / "c"), "--dtype", "f16"],
         "--dtype"),
        (["reference", "record", "--upstream", up, "--model", str(CKPT)], "--output is required"),
        (["reference", "record", "--upstream", up, "--model", str(CKPT), "--out", str(tmp_path / "r"),
          "--device", "tpu"], "--device"),
        (["reference", "record", "--upstream", up, "--model", str(CKPT), "--out", str(tmp_path / "r"),
          "--image", str(tmp_path / "none.png")], "does not exist"),
        (["reference", "record", "--upstream", up, "--model", str(CKPT), "--out", str(tmp_path / "r"),
          "--aspect", "wide"], "aspect"),
    ]
    for args, words in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert words in r.output and "Traceback" not in r.output, (args, r.output)


def test_reference_interpreter_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("VARGPT_REFERENCE_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(ReferenceError, match="does not exist"):
        reference_python()
    assert reference_python(sys.executable) == sys.executable
    monkeypatch.delenv("VARGPT_REFERENCE_PYTHON")
    assert reference_python() == sys.executable


def test_missing_torch_is_one_line_exit_2(tmp_path):
    """An interpreter without the extra: the recorder says what is missing in one line."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        pytest.skip("this interpreter has torch")
    up = env.upstream_dir()
    if up is None:
        (tmp_path / "up" / "vargpt_qwen_v1_1").mkdir(parents=True)
        (tmp_path / "up" / "vargpt_qwen_v1_1" / "modeling_vargpt_qwen2_vl.py").write_text("")
        up = tmp_path / "up"
    r = runner.invoke(app, ["reference", "random", "--upstream", str(up), "--sizes", "tiny", "--out",
                            str(tmp_path / "c"), "--python", sys.executable])
    assert r.exit_code == 2, r.output
    assert "needs torch" in r.output and "[reference] extra" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------------------ with torch
def test_flash_attn_standin_is_exact():
    """The stand-in's varlen attention (grouped heads, causal bottom-right, bf16 in) against float64."""
    py, up = env.require()
    import subprocess

    r = subprocess.run([py, str(env.WORKER), "selftest", "--upstream", str(up)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = env.last_json(r.stdout)
    assert res["ok"] and res["standin_max_abs_err_vs_float64"] < 1e-5, res
    assert res["upstream_import"] == "ok"


def test_random_checkpoint_loads_in_the_port(tmp_path):
    py, up = env.require()
    r = runner.invoke(app, ["reference", "random", "--upstream", str(up), "--sizes", "tiny,llm_kv_heads=1",
                            "--seed", "3", "--out", str(tmp_path / "ckpt"), "--python", py])
    assert r.exit_code == 0, r.output
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
            "tiny_arch.json"} <= files
    from safetensors.numpy import load_file

    from vargpt_mlx.loading import load_model

    got, fixture = load_file(str(tmp_path / "ckpt" / "model.safetensors")), load_file(str(CKPT / "model.safetensors"))
    assert set(got) == set(fixture)  # upstream's key names, every one
    norm = got["model.layers.0.input_layernorm.weight"]
    assert 0.5 < norm.mean() < 1.5 and norm.std() > 0.01  # norms randomised too
    assert got["vargpt_gen.block_chunks.0.module.0.sa.q_bias"].std() > 0.01  # and biases
    assert load_model(tmp_path / "ckpt").config.llm.num_key_value_heads == 1
    r = runner.invoke(app, ["reference", "random", "--upstream", str(up), "--sizes", "tiny", "--out",
                            str(tmp_path / "ckpt"), "--python", py])
    assert r.exit_code == 2 and "not empty" in r.output


def test_record_bad_checkpoint_is_one_line_exit_2(tmp_path):
    py, up = env.require()
    r = runner.invoke(app, ["reference", "record", "--upstream", str(up), "--model", str(tmp_path / "none"),
                            "--out", str(tmp_path / "r"), "--python", py])
    assert r.exit_code == 2, r.output
    assert "does not exist" in r.output and "Traceback" not in r.output
