"""The nano recipe still runs: a few steps of every stage (data, VAE, vision, SFT, DPO, eval) through the
CLI, then the result loads and runs every job. Learns nothing; proves the code path."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from vargpt_mlx.cli.main import app


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nano")
    r = CliRunner().invoke(app, ["train", "nano", "--out", str(out), "--smoke"])
    assert r.exit_code == 0, r.output
    return out, r.output


def test_every_stage_runs_and_resumes(smoke_run):
    out, log = smoke_run
    for f in ("data/done.json", "tokenizer/tokenizer.json", "tokenizer/preprocessor_config.json", "vae.safetensors",
              "vision.safetensors", "sft_model/config.json", "sft_model/preprocessor_config.json",
              "dpo_model/config.json", "dpo_model-q8/config.json", "dpo_model-q4/config.json", "eval.json",
              "times.json"):
        assert (out / f).exists(), f
    table = json.loads((out / "eval.json").read_text())
    assert {"sft/heldout", "dpo/heldout", "dpo/train", "dpo-q8/heldout", "dpo-q4/heldout"} <= set(table)
    fractions = [v for k, row in table.items() if "/" in k for j, v in row.items() if j not in ("n", "gen_parts")]
    fractions += [v for k, row in table.items() if "/" in k for v in row.get("gen_parts", {}).values()]
    fractions += [v for j, v in table["vae_ceiling"].items() if j not in ("n", "psnr")]
    assert fractions and all(0.0 <= v <= 1.0 for v in fractions)
    assert set(table["sft/heldout"]["gen_parts"]) == {"background", "count", "colours", "shapes"}
    # a second run finds every stage done and redoes nothing
    r = CliRunner().invoke(app, ["train", "nano", "--out", str(out), "--smoke"])
    assert r.exit_code == 0, r.output
    import re

    assert not re.search(r"^(vae|vae decoder|vision|sft|dpo) \d+/\d+", r.output, re.M), r.output  # no training step


def test_smoke_model_runs_every_job(smoke_run):
    from vargpt_mlx import api
    from vargpt_mlx.chat import ChatSession

    out, _ = smoke_run
    pipe = api.load(out / "dpo_model")
    assert pipe.config.pn == "0.016M"
    img = api.generate_image(pipe, "a red star on a blue background", seed=0)[0]
    assert img.size == (128, 128)
    ed = api.edit_image(pipe, img, "Make the star green.", seed=0)[0]
    assert ed.size == (128, 128)
    reply = "".join(t for t in ChatSession(pipe, max_tokens=4).send("What shape is in the image?", images=[img])
                    if isinstance(t, str))
    assert isinstance(reply, str)


def test_full_fine_tune_trains_every_weight_but_the_vae(smoke_run, tmp_path):
    """``--fine-tune-type full`` (the recipe's SFT mode) through the CLI: all weights but the VAE's
    change, adapters.safetensors holds them, and --adapter-path loads them over the base."""
    from mlx.utils import tree_flatten

    from vargpt_mlx import api

    out, _ = smoke_run
    data = out / "data" / "train" / "t2i.json"
    adapters = tmp_path / "full"
    r = CliRunner().invoke(app, ["train", "sft", "--model", str(out / "dpo_model"), "--data", str(data),
                                 "--adapter-path", str(adapters), "--fine-tune-type", "full", "--iters", "2",
                                 "--learning-rate", "1e-3"])
    assert r.exit_code == 0, r.output
    saved = mx.load(str(adapters / "adapters.safetensors"))
    assert not any(k.startswith("vae_local.") for k in saved)
    assert any(k.startswith("model.layers.") for k in saved) and any(k.startswith("vargpt_gen.") for k in saved)
    base = dict(tree_flatten(api.load(out / "dpo_model").model.parameters()))
    tuned = dict(tree_flatten(api.load(out / "dpo_model", adapter_path=adapters).model.parameters()))
    changed = [k for k in saved if not np.array_equal(np.asarray(base[k]), np.asarray(tuned[k]))]
    assert len(changed) > 0.5 * len(saved)
    assert all(np.array_equal(np.asarray(base[k]), np.asarray(tuned[k])) for k in base if k.startswith("vae_local."))


def test_decoder_edge_weights():
    """The decoder refinement's weights: 1 on flat areas, 1 + w within 3 px of a colour edge."""
    from vargpt_mlx.nano.recipe import edge_weights

    x = np.full((1, 32, 32, 3), -1.0, np.float32)
    assert np.array_equal(edge_weights(x, 4.0), np.ones((1, 32, 32), np.float32))
    x[0, 10:20, 10:20] = 1.0  # a white square on black: edges at rows / columns 9|10 and 19|20
    w = edge_weights(x, 4.0)
    assert w[0, 15, 15] == 1.0 and w[0, 0, 0] == 1.0  # centre of the square, far corner
    assert w[0, 10, 15] == 5.0 and w[0, 6, 15] == 5.0 and w[0, 5, 15] == 1.0  # 3 px out from row 9
    assert w[0, 15, 23] == 5.0 and w[0, 15, 24] == 1.0
