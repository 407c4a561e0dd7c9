"""The nano world: procedural scenes and texts, the pixel analyzer that grades outputs, the tokenizer.

Checks that the analyzer recovers >= 99 % of attributes (background, count, shape, colour, size,
position) on jittered renders of both splits, on shapes drawn with plain PIL and PIL's own colours,
and (>= 95 %) on blurred, noisy renders; that ``write_dataset`` is deterministic, loads with the
trainer's loaders and its ground truth grades its own images / answers right (and the rejected DPO
images wrong); that training never holds a held-out pair or edit and held-out always does; the
required wordings; and the BPE tokenizer (loads, round-trips, contiguous special ids after the
ordinary vocabulary, the same config as ``build_tokenizer_files``, deterministic).
"""

from __future__ import annotations

import json

from vargpt_mlx.api import EDIT_ASSISTANT_PREFIX

import numpy as np
import pytest
from PIL import Image, ImageColor, ImageDraw, ImageFilter

from vargpt_mlx.nano import evaluate as ev
from vargpt_mlx.nano import world as W
from vargpt_mlx.nano.world import ANCHORS, COLOUR_NAMES, Obj, Scene


def _attr_score(pairs) -> tuple[int, int, list]:
    """(right, total, failures) over background, count and per-object attributes."""
    right = total = 0
    bad = []
    for exp, got in pairs:
        checks = [got.background == exp.background and got.split == exp.split,
                  len(got.objects) == len(exp.objects)]
        if checks[1]:
            for a in ("shape", "colour", "size", "position"):
                checks += [getattr(x, a) == getattr(y, a) for x, y in zip(exp.objects, got.objects)]
        else:
            checks += [False] * 4 * len(exp.objects)
        right += sum(checks)
        total += len(checks)
        if not all(checks):
            bad.append((exp, got))
    return right, total, bad


def test_analyzer_jittered_renders():
    rng = np.random.default_rng(11)
    pairs = []
    for i in range(300):
        sc = W.sample_scene(rng, W.SPLITS[i % 2])
        pairs.append((sc, ev.analyze(W.render(sc, rng=rng))))
    right, total, bad = _attr_score(pairs)
    assert right / total >= 0.99, bad[:5]


def _pil_draw(scene: Scene) -> Image.Image:
    """Another tool's drawing: plain ImageDraw, no anti-aliasing, PIL's named colours."""
    rgb = {c: ImageColor.getrgb(c) for c in COLOUR_NAMES}
    im = Image.new("RGB", (128, 128), rgb[scene.background[0]])
    dr = ImageDraw.Draw(im)
    for o in scene.objects:
        cx, cy = ANCHORS[o.position][0] * 128, ANCHORS[o.position][1] * 128
        r = 18 if o.size == "small" else 30
        cx, cy = min(max(cx, r + 3), 125 - r), min(max(cy, r + 3), 125 - r)
        c = rgb[o.colour]
        if o.shape == "circle":
            dr.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
        elif o.shape == "square":
            dr.rectangle([cx - r, cy - r, cx + r, cy + r], fill=c)
        elif o.shape == "triangle":
            dr.polygon([(cx - r, cy + r), (cx + r, cy + r), (cx, cy - r)], fill=c)
        elif o.shape == "diamond":
            dr.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=c)
        else:
            pts = []
            for k in range(10):
                a = np.radians(-90 + 36 * k)
                rr = r if k % 2 == 0 else r * 0.5
                pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
            dr.polygon(pts, fill=c)
    return im


def test_analyzer_pil_plain_colours():
    im = Image.new("RGB", (128, 128), (0, 0, 255))
    ImageDraw.Draw(im).ellipse([44, 44, 84, 84], fill=(255, 0, 0))
    assert ev.analyze(im) == Scene(("blue",), [Obj("circle", "red", "small", "centre")])
    rng = np.random.default_rng(12)
    pairs = []
    for i in range(150):
        sc = W.sample_scene(rng, W.SPLITS[i % 2], background="plain")
        pairs.append((sc, ev.analyze(_pil_draw(sc))))
    right, total, bad = _attr_score(pairs)
    assert right / total >= 0.99, bad[:5]


def test_analyzer_blur_and_noise():
    rng = np.random.default_rng(13)
    pairs = []
    for i in range(100):
        sc = W.sample_scene(rng, W.SPLITS[i % 2])
        im = W.render(sc, rng=rng).filter(ImageFilter.GaussianBlur(1.0))
        a = np.asarray(im, np.float32) + rng.normal(0, 8, (128, 128, 3))
        pairs.append((sc, ev.analyze(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))))
    right, total, bad = _attr_score(pairs)
    assert right / total >= 0.97, bad[:5]


def test_analyzer_other_image_size():
    sc = Scene(("white",), [Obj("star", "black", "small", "left"), Obj("triangle", "orange", "large", "right")])
    assert ev.analyze(W.render(sc, size=256)) == sc


def test_train_never_heldout_and_heldout_always():
    rng = np.random.default_rng(14)
    for _ in range(400):
        assert W.scene_ok(W.sample_scene(rng, "train"), "train")
        sc = W.sample_scene(rng, "heldout")
        assert any(W.is_heldout_pair(o.colour, o.shape) for o in sc.objects)
        t = W.sample_t2i(rng, "train")
        assert W.scene_ok(t["scene"], "train")
        assert any(W.is_heldout_pair(o["colour"], o["shape"]) for o in W.sample_t2i(rng, "heldout")["spec"]["objects"])
        e = W.sample_edit(rng, "train")
        assert W.edit_key(e["edit"]) not in W.HELDOUT_EDITS
        assert W.scene_ok(e["before"], "train") and W.scene_ok(e["after"], "train")
        assert W.edit_key(W.sample_edit(rng, "heldout")["edit"]) in W.HELDOUT_EDITS
        d = W.sample_dpo_image(rng, "train")
        assert W.scene_ok(d["scene"], "train") and W.scene_ok(d["rejected"], "train")
        q = W.sample_dpo_text(rng, "train")
        assert W.scene_ok(q["scene"], "train")
        if q["query"]:
            assert not W.is_heldout_pair(*q["query"])
        for text in (q["question"], q["answer"], q["rejected"], t["prompt"], e["instruction"]):
            objs, _ = ev.parse_caption(text)
            assert not any(W.is_heldout_pair(o["colour"], o["shape"]) for o in objs), text
    # every colour and every shape still appears in training, each held-out pair excluded
    colours = {c for c, _ in W.HELDOUT_PAIRS}
    shapes = {s for _, s in W.HELDOUT_PAIRS}
    for c in colours:
        assert sum((c, s) not in W.HELDOUT_PAIRS for s in W.SHAPES) >= 3
    for s in shapes:
        assert sum((c, s) not in W.HELDOUT_PAIRS for c in COLOUR_NAMES) >= 3
    assert {k for k, _ in W.HELDOUT_EDITS} == set(W.EDIT_KINDS)


def test_required_wordings():
    one = Scene(("blue",), [Obj("star", "red", "large", "centre")])
    two = Scene(("green",), [Obj("star", "red", "small", "left"), Obj("circle", "white", "small", "right")])
    assert "What shape is in the image?" in W.QUESTION_TEMPLATES["shape"]
    assert {"What colour is the {shape}?", "What color is the {shape}?"} <= set(W.QUESTION_TEMPLATES["colour"])
    assert W.answer(one, "shape") == "A star."
    assert W.answer(two, "shape") == "A star and a circle."
    assert W.answer(two, "colour", 1) == "White."
    assert W.answer(two, "position", 0) == "On the left."
    assert W.answer(two, "yesno", query=("red", "star")) == "Yes."
    assert W.answer(two, "yesno", query=("red", "circle")) == "No."
    assert W.answer(two, "count") == "Two."
    assert "{objs} on {bg}" in W.T2I_TEMPLATES and "Draw {objs} on {bg}." in W.T2I_TEMPLATES
    assert "Make the {shape} {colour}." in W.EDIT_TEMPLATES["recolour"]
    assert "Turn the {shape} into {a_new}." in W.EDIT_TEMPLATES["reshape"]
    assert "Move the {shape} to the {position}." in W.EDIT_TEMPLATES["move"]
    assert "Add {a_obj} on the {position}." in W.EDIT_TEMPLATES["add"]
    assert "Remove the {shape}." in W.EDIT_TEMPLATES["remove"]
    rng = np.random.default_rng(0)
    assert "{objs} on {bg}".format(objs=W.obj_phrase(Obj("circle", "red")), bg=W.bg_phrase(
        Scene(("blue",)))) == "a red circle on a blue background"
    prompts = {W.sample_t2i(rng)["prompt"] for _ in range(300)}
    assert any(p.startswith(("a ", "an ")) and p.endswith(" background") for p in prompts)
    assert any(p.startswith("Generate an image of ") for p in prompts)
    assert W.edit_instruction({"kind": "recolour", "shape": "square", "colour": "blue"}, rng) in {
        t.format(shape="square", colour="blue") for t in W.EDIT_TEMPLATES["recolour"]}
    assert W.caption(one, np.random.default_rng(1)).endswith(".")
    assert W.bg_phrase(Scene(("orange", "red"), [], "vertical")) == "an orange and red background"


def test_check_answer():
    assert ev.check_answer("colour", "Red.", "red")
    assert ev.check_answer("colour", "Red.", " RED ! ")
    assert not ev.check_answer("colour", "Red.", "Blue.")
    assert ev.check_answer("shape", "A star and a circle.", "a circle and a star")
    assert ev.check_answer("count", "Two.", "2")
    assert ev.check_answer("position", "In the centre.", "in the center")
    assert ev.check_answer("caption", "A red star on a blue background.",
                           "There is a red star in the centre. The background is blue.")
    assert not ev.check_answer("caption", "A red star on a blue background.", "A red star on a green background.")
    assert not ev.check_answer("caption", "There is a red star on the right. The background is blue.",
                               "A small red star at the top, on a blue background.")
    assert ev.parse_caption("A large red star on the left and a small blue circle at the top, on a "
                            "green and white background.") == (
        [{"colour": "red", "shape": "star", "size": "large", "position": "left"},
         {"colour": "blue", "shape": "circle", "size": "small", "position": "top"}], ["green", "white"])
    assert ev.normalise("What COLOR is it?") == ev.normalise("what colour is it")


def test_edit_and_generation_checks():
    before = Scene(("yellow",), [Obj("circle", "blue", "large", "left")])
    edit = {"kind": "add", "shape": "star", "colour": "red", "position": "right"}
    after = W.apply_edit(before, edit)
    assert ev.check_edit(before, edit, W.render(after, rng=np.random.default_rng(1)))
    assert not ev.check_edit(before, edit, W.render(before))
    assert not ev.check_edit(before, {"kind": "recolour", "shape": "circle", "colour": "red"}, W.render(before))
    spec = {"background": ["yellow"], "objects": [{"shape": "circle", "colour": "blue"}]}
    assert ev.check_generation(W.render(before), spec)
    assert ev.check_generation(W.render(before), before)
    assert not ev.check_generation(W.render(before), {**spec, "background": ["green"]})
    assert not ev.check_generation(W.render(before), {"background": ["yellow"], "objects": [
        {"shape": "circle", "colour": "blue", "position": "right"}]})
    every = {"background": True, "count": True, "colours": True, "shapes": True}
    assert ev.generation_parts(ev.analyze(W.render(before)), spec) == every
    two = W.render(after, rng=np.random.default_rng(1))  # blue circle + red star on yellow
    assert ev.generation_parts(ev.analyze(two), spec) == {**every, "count": False, "colours": False, "shapes": False}
    assert ev.generation_parts(ev.analyze(W.render(before)), {"background": ["green"], "objects": [
        {"shape": "star", "colour": "blue"}]}) == {**every, "background": False, "shapes": False}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("nano")
    kw = dict(seed=3, n_und=40, n_t2i=30, n_edit=30, n_dpo_img=15, n_dpo_txt=15)
    return W.write_dataset(d / "a", **kw), W.write_dataset(d / "b", **kw), \
        W.write_dataset(d / "h", split="heldout", **kw)


def test_write_dataset_deterministic(dataset):
    a, b, _ = dataset
    for k in ("und", "t2i", "edit", "dpo_img", "dpo_txt", "meta"):
        assert a[k].read_bytes() == b[k].read_bytes(), k
    names = sorted(p.name for p in a["images"].iterdir())
    assert names == sorted(p.name for p in b["images"].iterdir())
    assert len(names) == 40 + 30 + 60 + 30 + 15
    for n in names[::7]:
        assert (a["images"] / n).read_bytes() == (b["images"] / n).read_bytes()


def test_write_dataset_loads_and_is_right(dataset):
    from vargpt_mlx.training.data import load_preference_records, load_sft_records

    for paths in (dataset[0], dataset[2]):
        meta = json.loads(paths["meta"].read_text())
        for k in ("und", "t2i", "edit"):
            assert len(load_sft_records(paths[k])) == len(meta[k])
        for k in ("dpo_img", "dpo_txt"):
            assert len(load_preference_records(paths[k])) == len(meta[k])
        base = paths["meta"].parent
        und = json.loads(paths["und"].read_text())
        for rec, m in zip(und, meta["und"]):
            assert ev.analyze(Image.open(base / rec["images"][0])) == Scene.from_dict(m["scene"])
            assert ev.check_answer(m["kind"], m["expected"], rec["messages"][1]["content"])
            assert rec["messages"][0]["content"] == m["question"] + "<image>"
        t2i = json.loads(paths["t2i"].read_text())
        for rec, m in zip(t2i, meta["t2i"]):
            assert rec["messages"][1]["content"] == "<image_gen>"
            assert ev.check_generation(Image.open(base / rec["images"][0]), m["spec"])
        edit = json.loads(paths["edit"].read_text())
        for rec, m in zip(edit, meta["edit"]):
            assert ev.check_edit(m["before"], m["edit"], Image.open(base / rec["images"][1]))
            assert rec["messages"][0]["content"].endswith("<image>")
            # the edit command puts upstream's prefix before <|image_gen_start|>: train on the same
            assert rec["messages"][1]["content"] == EDIT_ASSISTANT_PREFIX + "<image_gen>"
        dpo = json.loads(paths["dpo_img"].read_text())
        for rec, m in zip(dpo, meta["dpo_img"]):
            assert ev.check_generation(Image.open(base / rec["chosen"]["image"]), m["spec"])
            assert not ev.check_generation(Image.open(base / rec["rejected"]["image"]), m["spec"])
        dpt = json.loads(paths["dpo_txt"].read_text())
        for rec, m in zip(dpt, meta["dpo_txt"]):
            assert ev.check_answer(m["kind"], m["expected"], rec["chosen"]["content"])
            assert not ev.check_answer(m["kind"], m["expected"], rec["rejected"]["content"])
    held = json.loads(dataset[2]["meta"].read_text())
    for m in held["und"] + held["t2i"]:
        assert not W.scene_ok(Scene.from_dict(m["scene"]), "train")


def test_nano_tokenizer(tmp_path):
    from vargpt_mlx.nano.tokenizer import build_nano_tokenizer
    from vargpt_mlx.tokenizer import QWEN2_VL_SPECIAL, VARGPT_SPECIAL, build_tokenizer_files, load_tokenizer

    lines = list(W.corpus(0, 2000))
    assert len(lines) == 2000 and lines == list(W.corpus(0, 2000))
    ids = build_nano_tokenizer(tmp_path / "a", lines, vocab_size=512)
    specials = QWEN2_VL_SPECIAL + VARGPT_SPECIAL
    assert list(ids) == list(specials) and list(ids.values()) == list(range(512, 512 + len(specials)))
    build_nano_tokenizer(tmp_path / "b", lines, vocab_size=512)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    tok = load_tokenizer(tmp_path / "a")
    assert tok.convert_tokens_to_ids("<|image_gen_pad|>") == ids["<|image_gen_pad|>"]
    assert tok.convert_tokens_to_ids("<|im_end|>") == ids["<|im_end|>"]
    for s in lines[::97] + ["What colour is the star?<|image_pad|>", "Ünïcödé 你好 🤖", "<|im_start|>user\nhi"]:
        e = tok.encode(s)
        assert tok.decode(e) == s
        assert max(e) < 512 + len(specials)
    assert len(tok.encode("What colour is the star?")) < 10  # world words are merged tokens
    assert tok.encode("<|image_gen_start|>") == [ids["<|image_gen_start|>"]]

    # the same tokenizer_config.json as build_tokenizer_files writes
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    (tmp_path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(alphabet)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    build_tokenizer_files(tmp_path / "vocab.json", tmp_path / "merges.txt", tmp_path / "ref")
    assert json.loads((tmp_path / "ref" / "tokenizer_config.json").read_text()) == \
        json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
