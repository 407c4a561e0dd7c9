"""The shipped nano model (``--model nano``) does the three jobs on the held-out split: prompts
and questions about attribute combinations it never saw in training, judged by the pixel
evaluator (``vargpt_mlx.nano.evaluate``, itself checked in ``test_nano_world.py``).

The held-out records are rebuilt here from their seed (``world.write_dataset`` is deterministic),
so nothing is read from the training run. Each check uses fixed seeds and a pass threshold set
below the figure measured for the shipped model (``vargpt_mlx/nano/model/nano.json``), leaving
room for a few flips from float summation order on other BLAS builds, never below the figure a
random model scores (0 % on every job).
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vargpt_mlx.hub import NANO_DIR

pytestmark = pytest.mark.skipif(not (NANO_DIR / "config.json").is_file(), reason="nano model not built")

N = 40  # held-out records per job (greedy answers: ~0.1 s each)
HELDOUT_SEED = 1  # the recipe writes the held-out split with seed + 1 (DataArgs.seed = 0)
# Measured for the shipped model on these 40 records per job (this machine, the same with MLX's
# bundled BLAS and with OpenBLAS): 14 / 40 answers right (35 %; the recipe's eval: 48 % of other 100
# records; the model before this one: 17 / 40); drawings (upstream sampling, seed = record index):
# 5 / 40 pass the evaluator, backgrounds right in 39, object colours in 30. Thresholds sit two
# binomial standard deviations below the measured count (answers / bits that flip on another BLAS):
# sqrt(40 p (1 - p)) = 3.0 answers, 2.1 drawings, 1.0 backgrounds, 2.7 colours. A random-weight model
# scores 0 on answers and drawings.
UND_MIN = 8
KIND_MIN_FRACTION = 0.9
GEN_MIN, BACKGROUND_MIN, COLOURS_MIN = 1, 37, 24


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from vargpt_mlx.nano import world

    out = tmp_path_factory.mktemp("heldout")
    paths = world.write_dataset(out, seed=HELDOUT_SEED, split="heldout", n_und=N, n_t2i=N, n_edit=N,
                                n_dpo_img=0, n_dpo_txt=0)
    meta = json.loads(paths["meta"].read_text())
    recs = {k: json.loads(paths[k].read_text()) for k in ("und", "t2i", "edit")}
    return out, meta, recs


@pytest.fixture(scope="module")
def pipe():
    from vargpt_mlx import api

    return api.load("nano")


def test_card_and_size():
    card = json.loads((NANO_DIR / "nano.json").read_text())
    shipped = card["eval"]["shipped"]
    assert {f"{shipped}/heldout", f"{shipped}/train", f"{shipped}-q8/heldout", f"{shipped}-q4/heldout"} <= set(card["eval"])
    size = sum(f.stat().st_size for f in NANO_DIR.iterdir())
    assert size <= 40 * 2**20, size


@pytest.mark.xfail(strict=True, reason="the shipped run measured 94.4 min (VAE 29 min, SFT 60 min beside the decoder "
                   "refinement and two experiment runs), over the 60-min budget; see README 'The nano model'")
def test_recipe_time_within_budget():
    card = json.loads((NANO_DIR / "nano.json").read_text())
    assert card["training_seconds"] <= 3600


def test_answers_heldout_questions(pipe, heldout):
    """Questions about attribute combinations never seen in training, judged by the evaluator."""
    import re

    from vargpt_mlx.chat import ChatSession
    from vargpt_mlx.nano import evaluate as ev
    from vargpt_mlx.nano import world

    base, meta, recs = heldout
    ok, kind_ok, kinds = 0, 0, 0
    words = {"colour": set(world.COLOUR_NAMES), "background": set(world.COLOUR_NAMES), "shape": set(world.SHAPES),
             "yesno": {"yes", "no"}}
    for rec, m in zip(recs["und"], meta["und"]):
        reply = "".join(t for t in ChatSession(pipe, max_tokens=24).send(m["question"], images=[base / rec["images"][0]])
                        if isinstance(t, str))
        ok += ev.check_answer(m["kind"], m["expected"], reply)
        if m["kind"] in words:
            kinds += 1
            kind_ok += bool(set(re.findall(r"[a-z]+", reply.lower())) & words[m["kind"]])
    assert ok >= UND_MIN, f"{ok}/{N} right"
    assert kinds and kind_ok / kinds >= KIND_MIN_FRACTION, f"{kind_ok}/{kinds} of the asked kind"


def test_draws_heldout_prompts(pipe, heldout):
    """Prompts naming attribute combinations never seen in training, drawn with upstream's sampling
    settings and judged by the evaluator: whole drawings, and backgrounds and object colours alone."""
    from vargpt_mlx import api
    from vargpt_mlx.nano import evaluate as ev

    _, meta, _ = heldout
    full = background = colours = 0
    for i, m in enumerate(meta["t2i"]):
        img = api.generate_image(pipe, m["prompt"], seed=i)[0]
        assert img.size == (128, 128) and img.info["seed"] == str(i)
        found = ev.analyze(img)
        full += ev.scene_matches(found, m["spec"])
        parts = ev.generation_parts(found, m["spec"])
        background += parts["background"]
        colours += parts["colours"]
    assert full >= GEN_MIN and background >= BACKGROUND_MIN and colours >= COLOURS_MIN, (full, background, colours)


def test_edits_at_its_size(pipe, heldout):
    """Editing runs end to end at 128x128 (1 / 40 edits pass the evaluator: no accuracy asserted,
    see the README)."""
    from vargpt_mlx import api

    base, meta, recs = heldout
    ed = api.edit_image(pipe, Image.open(base / recs["edit"][0]["images"][0]), meta["edit"][0]["instruction"], seed=0)[0]
    assert ed.size == (128, 128)
