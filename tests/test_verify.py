"""End to end: ``vargpt-mlx verify`` on the public bundle (every reference family) and its errors."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from cli.main import app
from tests.conftest import CKPT, FIXTURES
from vargpt_mlx.verify import Verifier, verify

REFS = FIXTURES / "refs.safetensors"


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
                 "vae.decode_out", "vae.bsc_gt_BL", "vae.bsc_recon", "sft_t2i.loss_total",
                 "sft_und.loss_plainpos", "sft_und.loss_mrope"):
        assert must in compared, must


def test_verify_cli_prints_table_and_exits_zero():
    r = CliRunner().invoke(app, ["verify", "--model", str(CKPT), "--refs", str(REFS)])
    assert r.exit_code == 0, r.output
    assert "0 failed" in r.output and "und.logits_mrope" in r.output


def test_verify_cli_fails_on_mismatch(tmp_path):
    """A perturbed reference must make verify exit non-zero and say FAIL."""
    import numpy as np
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
    """The bf16 checkpoint (as released upstream) against upstream's bf16 run, bf16 tolerances."""
    results = verify(FIXTURES / "checkpoint_bf16", FIXTURES / "refs_bf16.safetensors")
    failed = [c for _, c in results if not c.ok]
    assert not failed, failed
    compared = {c.name for _, c in results}
    assert {"und.logits_mrope", "gen.s6.bit_logits_cfg", "gen.s6.bits", "gen.image_rgb_u8",
            "sft_t2i.loss_total"} <= compared
    assert all(c.kind in ("rel", "exact", "u8mean") for _, c in results)
