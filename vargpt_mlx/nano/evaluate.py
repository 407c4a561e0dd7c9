"""Read a nano-world image back into a :class:`~vargpt_mlx.nano.world.Scene`, and grade outputs.

``analyze`` works from pixels only (numpy; no scipy):

* background: the border (2 px band) pixels are named (nearest named colour in CIE Lab); the
  dominant name is the background, and it is two-tone when a second name holds >= 20 % of the
  border and the left / right (-> ``split="vertical"``) or top / bottom (``"horizontal"``) strips
  have these two as different majorities (the purer pair of strips wins); ``background[0]`` is
  then the left / top half.
* objects: pixels farther than ``FG_THRESHOLD`` (RGB) from every background colour (the median
  border RGB of each), opened with a 3x3 square (removes speckle noise and 1-2 px blend lines),
  labelled into 4-connected components; components under 0.4 % of the image or thinner than 5 %
  of its side are ignored.
* colour: nearest named colour (Lab) of the median of the component's eroded (inner) pixels;
  shape: nearest centroid of the component's bounding-box crop resized to a 16x16 occupancy map
  (centroids fitted on first use from ~500 masks drawn with jittered parameters, a fixed seed);
  size: bounding-box extent vs ``world.SIZE_THRESHOLD``; position: nearest anchor to the
  bounding-box centre.
"""

from __future__ import annotations

import itertools
import re
from functools import lru_cache

import numpy as np
from PIL import Image

from .world import (ANCHORS, COLOUR_NAMES, COLOURS, POS_ORDER, SHAPES, SIZE_THRESHOLD, Obj, Scene,
                    apply_edit, shape_alpha)

FG_THRESHOLD = 45.0
BORDER = 2
GRID = 16


# ---------------------------------------------------------------------------------- colours
def _to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., 3) in 0..255 -> CIE Lab (D65)."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_LAB = _to_lab(np.array([COLOURS[c] for c in COLOUR_NAMES]))


def name_colours(rgb: np.ndarray) -> np.ndarray:
    """Index into ``COLOUR_NAMES`` of the nearest named colour (Lab distance) of each RGB."""
    lab = _to_lab(rgb)
    d = ((lab[..., None, :] - _PALETTE_LAB) ** 2).sum(-1)
    return d.argmin(-1)


def name_colour(rgb) -> str:
    return COLOUR_NAMES[int(name_colours(np.asarray(rgb, np.float64)[None])[0])]


# ------------------------------------------------------------------------------- morphology
def _shift_or(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    out = np.zeros_like(m)
    h, w = m.shape
    for dy in range(3):
        for dx in range(3):
            out |= p[dy:dy + h, dx:dx + w]
    return out


def _shift_and(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    out = np.ones_like(m)
    h, w = m.shape
    for dy in range(3):
        for dx in range(3):
            out &= p[dy:dy + h, dx:dx + w]
    return out


def _open(m: np.ndarray) -> np.ndarray:
    return _shift_or(_shift_and(m))


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components: (labels (h, w) int, 0 = background, 1..n; n)."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    flat_mask = mask.ravel()
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        nb = np.where(mask, nb, big)
        # pointer jumping: follow each label to its root's current label
        f = nb.ravel()
        fg = np.flatnonzero(flat_mask)
        for _ in range(2):
            f[fg] = f[f[fg]]
        nb = f.reshape(h, w)
        if np.array_equal(nb, lab):
            break
        lab = nb
    roots, inv = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((h, w), np.int32)
    out[mask] = inv.ravel() + 1
    return out, len(roots)


# ------------------------------------------------------------------------------------ shapes
def mask_features(mask: np.ndarray) -> np.ndarray:
    """The bounding-box crop of a binary mask resized to GRID x GRID occupancy, flattened."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    im = Image.fromarray((crop * 255).astype(np.uint8), "L").resize((GRID, GRID), Image.BOX)
    return np.asarray(im, np.float32).ravel() / 255.0


@lru_cache(maxsize=1)
def _centroids() -> np.ndarray:
    rng = np.random.default_rng(1234)
    cents = []
    for shape in SHAPES:
        feats = []
        for _ in range(100):
            d = float(rng.uniform(28, 68))
            kw = {"star_inner": float(rng.uniform(0.36, 0.56)), "tri_ratio": float(rng.uniform(0.78, 1.1)),
                  "aspect": float(rng.uniform(0.9, 1.1))}
            if shape not in ("circle",):
                kw["rotation"] = float(np.radians(rng.uniform(-6, 6)))
            a, _, _ = shape_alpha(shape, 60 + float(rng.random()), 60 + float(rng.random()), d,
                                  bool(rng.random() < 0.7), **kw)
            thr = float(rng.uniform(0.3, 0.7))
            feats.append(mask_features(_open(a >= thr)))
        cents.append(np.mean(feats, 0))
    return np.stack(cents)


def classify_shape(mask: np.ndarray) -> str:
    f = mask_features(mask)
    return SHAPES[int(((_centroids() - f) ** 2).sum(-1).argmin())]


# ---------------------------------------------------------------------------------- analyze
def _background(arr: np.ndarray) -> tuple[tuple[str, ...], str | None, list[np.ndarray]]:
    h, w, _ = arr.shape
    b = BORDER
    strips = {"top": arr[:b].reshape(-1, 3), "bottom": arr[-b:].reshape(-1, 3),
              "left": arr[b:-b, :b].reshape(-1, 3), "right": arr[b:-b, -b:].reshape(-1, 3)}
    names = {k: name_colours(v) for k, v in strips.items()}
    allpix = np.concatenate(list(strips.values()))
    alln = np.concatenate(list(names.values()))
    counts = np.bincount(alln, minlength=len(COLOUR_NAMES))
    order = np.argsort(-counts, kind="stable")
    c1, c2 = int(order[0]), int(order[1])

    def maj(k) -> tuple[int, float]:
        cnt = np.bincount(names[k], minlength=len(COLOUR_NAMES))
        return int(cnt.argmax()), float(cnt.max() / cnt.sum())

    bg: tuple[int, ...] = (c1,)
    split = None
    if counts[c2] >= 0.2 * len(alln):
        best = 0.0
        for a, b, orient in (("left", "right", "vertical"), ("top", "bottom", "horizontal")):
            (ma, pa), (mb, pb) = maj(a), maj(b)
            # the two halves' strips: each (nearly) one colour, c1 on one side and c2 on the other
            if {ma, mb} == {c1, c2} and pa + pb > best:
                best, bg, split = pa + pb, (ma, mb), orient
    rgbs = [np.median(allpix[alln == c], 0) for c in bg]
    return tuple(COLOUR_NAMES[c] for c in bg), split, rgbs


def _position(cx: float, cy: float) -> str:
    return min(ANCHORS, key=lambda p: (ANCHORS[p][0] - cx) ** 2 + (ANCHORS[p][1] - cy) ** 2)


def analyze(img) -> Scene:
    """The scene an image shows (see the module docstring); objects in reading order."""
    if isinstance(img, Image.Image):
        img = img.convert("RGB")
    arr = np.asarray(img, np.float32)[..., :3]
    h, w, _ = arr.shape
    bg, split, rgbs = _background(arr)
    dist = np.min([np.sqrt(((arr - c) ** 2).sum(-1)) for c in rgbs], 0)
    raw = dist > FG_THRESHOLD
    lab, n = label(_open(raw))
    objs = []
    if n:
        areas = np.bincount(lab.ravel(), minlength=n + 1)
        for k in range(1, n + 1):
            if areas[k] < 0.004 * h * w:
                continue
            m = lab == k
            ys, xs = np.nonzero(m)
            bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            if min(bw, bh) < 0.05 * min(h, w):
                continue
            inner = _shift_and(m)
            pix = arr[inner] if inner.sum() >= 0.3 * areas[k] else arr[m]
            colour = name_colour(np.median(pix, 0))
            shape = classify_shape(m)
            size = "large" if max(bw / w, bh / h) > SIZE_THRESHOLD else "small"
            cx, cy = (xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h
            objs.append(Obj(shape, colour, size, _position(cx, cy)))
    objs.sort(key=lambda o: POS_ORDER[o.position])
    return Scene(bg, objs, split)


# ----------------------------------------------------------------------------------- checks
def _obj_matches(o: Obj, want: dict) -> bool:
    return all(getattr(o, k) == v for k, v in want.items() if k in ("shape", "colour", "size", "position"))


def scene_matches(found: Scene, spec: dict, exact_count: bool = True) -> bool:
    """``found`` shows the background and objects a spec names (see ``world.spec_of``)."""
    bg = spec.get("background")
    if bg is not None:
        if tuple(bg) != tuple(found.background):
            return False
        if len(bg) == 2 and spec.get("split") and spec["split"] != found.split:
            return False
    want = spec["objects"]
    if exact_count and len(found.objects) != len(want):
        return False
    for perm in itertools.permutations(found.objects, len(want)):
        if all(_obj_matches(o, s) for o, s in zip(perm, want)):
            return True
    return False


def as_spec(scene_or_spec) -> dict:
    """A ``Scene`` as the spec that requests everything in it (background, count, each object's
    shape, colour, size and position); a spec dict as it is."""
    if isinstance(scene_or_spec, Scene):
        s = scene_or_spec
        return {"background": list(s.background), "split": s.split, "objects": [o.to_dict() for o in s.objects]}
    return scene_or_spec


def check_generation(img, scene_or_spec, exact_count: bool = True) -> bool:
    """All requested attributes right. A ``Scene`` requests everything (``as_spec``); a spec dict
    (``world.spec_of`` / a t2i record's meta ``spec``) requests its background and, per object,
    shape, colour and only the size / position it names."""
    return scene_matches(analyze(img), as_spec(scene_or_spec), exact_count)


def generation_parts(found: Scene, scene_or_spec) -> dict[str, bool]:
    """Which parts of a request an analysed image (``found = analyze(img)``) gets right, each on
    its own: the background, the object count, the multiset of object colours and of shapes.
    Diagnostic figures beside ``scene_matches`` (which needs all of them, matched per object)."""
    spec = as_spec(scene_or_spec)
    want = spec["objects"]
    return {"background": tuple(found.background) == tuple(spec["background"]),
            "count": len(found.objects) == len(want),
            "colours": sorted(o.colour for o in found.objects) == sorted(o["colour"] for o in want),
            "shapes": sorted(o.shape for o in found.objects) == sorted(o["shape"] for o in want)}


def check_edit(before_scene: Scene | dict, instruction_spec: dict, after_img) -> bool:
    """The edit (``world.apply_edit`` spec) was made and the rest kept: background, count, every
    object's shape, colour, size and position (an added object's size is not checked)."""
    if isinstance(before_scene, dict):
        before_scene = Scene.from_dict(before_scene)
    want = apply_edit(before_scene, instruction_spec)
    objs = []
    for o in want.objects:
        d = o.to_dict()
        if instruction_spec["kind"] == "add" and o.shape == instruction_spec["shape"] \
                and o.position == instruction_spec["position"]:
            del d["size"]
        objs.append(d)
    spec = {"background": list(want.background), "split": want.split, "objects": objs}
    return scene_matches(analyze(after_img), spec)


_NUM = {"1": "one", "2": "two", "3": "three", "0": "zero"}


def normalise(text: str) -> str:
    """Lower case, "color" -> "colour", digits -> words, punctuation and extra spaces removed."""
    t = text.lower().replace("color", "colour").replace("center", "centre")
    t = re.sub(r"[^\w\s]", " ", t)
    return " ".join(_NUM.get(w, w) for w in t.split())


def _items(text: str) -> list[str]:
    parts = [p.strip() for p in normalise(text).split(" and ")]
    return sorted(re.sub(r"^(a|an|the) ", "", p) for p in parts)


_PHRASE_POS = {"on the left": "left", "on the right": "right", "at the top": "top",
               "at the bottom": "bottom", "in the centre": "centre"}


def parse_caption(text: str) -> tuple[list[dict], list[str]]:
    """(objects named: dicts with colour, shape and the size / position when named; background
    colours) of a caption."""
    words = normalise(text).split()
    objs, bgs, last, size = [], [], None, None
    for i, w in enumerate(words):
        if w in COLOURS:
            last = w
        elif w in ("small", "large"):
            size = w
        elif w.rstrip("s") in SHAPES and last is not None:
            o = {"colour": last, "shape": w.rstrip("s")}
            if size:
                o["size"] = size
            pos = _PHRASE_POS.get(" ".join(words[i + 1:i + 4]))
            if pos:
                o["position"] = pos
            objs.append(o)
            last = size = None
        elif w == "background":
            j = i - 1
            while j >= 0 and (words[j] in COLOURS or words[j] == "and"):
                if words[j] in COLOURS:
                    bgs.insert(0, words[j])
                j -= 1
    norm = normalise(text)
    if "background is" in norm:  # "The background is red and yellow."
        tail = norm.split("background is", 1)[1].split()
        bgs = [w for w in itertools.takewhile(lambda x: x in COLOURS or x == "and", tail) if w != "and"]
    return objs, bgs


def _same_objects(a: list[dict], b: list[dict]) -> bool:
    """Same colour-shape pairs; sizes / positions must agree where both name them."""
    if sorted((o["colour"], o["shape"]) for o in a) != sorted((o["colour"], o["shape"]) for o in b):
        return False
    for x in a:
        y = next(o for o in b if (o["colour"], o["shape"]) == (x["colour"], x["shape"]))
        if any(k in x and k in y and x[k] != y[k] for k in ("size", "position")):
            return False
    return True


def check_answer(question_kind: str, expected: str, answer_text: str) -> bool:
    """Normalised compare (case, punctuation, colour/color, digits vs words don't matter); lists
    ("A star and a circle.", "Red and yellow.") in any order; captions by the objects (colour,
    shape; size and position where both texts name them) and background colours they name."""
    if question_kind in ("shape", "background"):
        return _items(expected) == _items(answer_text)
    if question_kind == "caption":
        pe, be = parse_caption(expected)
        pa, ba = parse_caption(answer_text)
        return _same_objects(pe, pa) and sorted(be) == sorted(ba)
    return normalise(expected) == normalise(answer_text)
