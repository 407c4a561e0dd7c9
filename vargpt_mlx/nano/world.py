"""A procedurally generated world of simple shapes for training a nano VARGPT from scratch.

Everything is deterministic given a seed (numpy ``Generator`` s derived from ``(seed, job, index)``).

World
-----
* 8 colours (``COLOURS``, canonical RGB), 5 shapes (``SHAPES``), 2 sizes (``SIZES``: small is 34-42
  px across, large 56-62 px across in a 128 px image; "across" is the bounding-box extent), 5
  positions (``POSITIONS``: left / right / top / bottom at 1/4 and 3/4 of the image, centre).
* A scene holds one object (~75 %) or two. Two objects always sit at left + right or top + bottom,
  have different shapes (so "the star" is unambiguous) and at most one of them is large, so they
  never overlap (>= 6 px gap). A large object is pushed inwards so it stays 3 px inside the image.
* Background: plain (one colour) or two-tone (``Scene.split`` = ``"vertical"``: left half
  ``background[0]``, right half ``background[1]``; ``"horizontal"``: top half ``background[0]``,
  bottom half ``background[1]``). Object colours always differ from every background colour.
  Two-tone backgrounds only appear in understanding samples (captions / questions, named
  "a {c1} and {c2} background", ``c1`` = left / top half); generation prompts ("... on a {colour}
  background"), edits and image preference pairs always use plain backgrounds.

Held-out split
--------------
* ``HELDOUT_PAIRS``: 8 (colour, shape) pairs, one per colour; every colour keeps 4 shapes and
  every shape keeps 3-4 colours in training. ``split="train"`` never renders, mentions or asks
  about a held-out pair (not even in rejected DPO answers / images or "No." questions);
  ``split="heldout"`` scenes always contain one, and the text is about that object.
* ``HELDOUT_EDITS``: (edit kind, shape) pairs never used for training edits. The shape is the
  edited object's shape for recolour / move / remove, and the *new* shape for reshape / add.
  Held-out edit records use exactly these combinations; their objects are ordinary training pairs.

Unnamed attributes in a generation prompt take defaults: one object -> large, in the centre;
two objects -> both small, positions always named. An added object ("Add a ...") is small and goes
opposite the existing object (left <-> right, top <-> bottom); "move" and "add" are only asked of
one-object scenes (not at the centre for "add"), "remove" only of two-object scenes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 20),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
# anchor (x, y) as fractions of the image
ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
           "centre": (0.5, 0.5)}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
POS_ORDER = {"left": 0, "top": 1, "centre": 2, "bottom": 3, "right": 4}  # reading order of objects
POS_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
              "bottom": "at the bottom", "centre": "in the centre"}
# pixel sizes at 128 px: (canonical, jitter low, jitter high)
SIZE_PX = {"small": (38.0, 34.0, 42.0), "large": (59.0, 56.0, 62.0)}
SIZE_THRESHOLD = 48.0 / 128  # bounding-box extent / image size separating small from large
MARGIN = 3.0
# The assistant answer of edit samples: upstream's edit data prefix (what ``vargpt-mlx edit`` puts
# before <|image_gen_start|>, ``api.EDIT_ASSISTANT_PREFIX``), then the image.
EDIT_ANSWER = "The output image is: <image_gen>"
EDIT_KINDS = ("recolour", "reshape", "move", "add", "remove")
QUESTION_KINDS = ("shape", "colour", "count", "position", "yesno", "background", "size", "caption")

HELDOUT_PAIRS = frozenset({
    ("red", "star"), ("green", "diamond"), ("blue", "triangle"), ("yellow", "circle"),
    ("orange", "square"), ("purple", "star"), ("white", "triangle"), ("black", "diamond"),
})
HELDOUT_EDITS = frozenset({
    ("recolour", "triangle"), ("reshape", "star"), ("move", "circle"), ("add", "diamond"),
    ("remove", "square"),
})
SPLITS = ("train", "heldout")


# ------------------------------------------------------------------------------------ scenes
@dataclass
class Obj:
    shape: str
    colour: str
    size: str = "large"
    position: str = "centre"

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}


@dataclass
class Scene:
    """``background``: 1 colour (plain) or 2 (two-tone, ``split`` "vertical" / "horizontal")."""

    background: tuple[str, ...]
    objects: list[Obj] = field(default_factory=list)
    split: str | None = None  # background split orientation, None for a plain background

    def to_dict(self) -> dict:
        return {"background": list(self.background), "split": self.split,
                "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(d["background"]), [Obj(**o) for o in d["objects"]], d.get("split"))

    def find(self, shape: str) -> int | None:
        for i, o in enumerate(self.objects):
            if o.shape == shape:
                return i
        return None


def _sorted(objs: list[Obj]) -> list[Obj]:
    return sorted(objs, key=lambda o: POS_ORDER[o.position])


def is_heldout_pair(colour: str, shape: str) -> bool:
    return (colour, shape) in HELDOUT_PAIRS


def _pair_ok(colour: str, shape: str, split: str | None) -> bool:
    """A pair allowed to appear in ``split`` ("train": no held-out pair; else anything)."""
    return split != "train" or (colour, shape) not in HELDOUT_PAIRS


def scene_ok(scene: Scene, split: str) -> bool:
    return all(_pair_ok(o.colour, o.shape, split) for o in scene.objects)


def _choice(rng: np.random.Generator, seq):
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def sample_scene(rng: np.random.Generator, split: str = "train", n_objects: int | None = None,
                 background: str = "any") -> Scene:
    """A random scene. ``background``: "any" (25 % two-tone) or "plain".

    ``split="train"`` never holds a held-out (colour, shape) pair; ``"heldout"`` always holds
    exactly one (the first object sampled; the other, if any, is an ordinary pair).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = n_objects if n_objects is not None else (1 if rng.random() < 0.75 else 2)
    if n not in (1, 2):
        raise ValueError("a scene holds 1 or 2 objects")
    two_tone = background == "any" and rng.random() < 0.25
    # object (colour, shape) pairs first, then a background avoiding their colours
    pairs: list[tuple[str, str]] = []
    if split == "heldout":
        pairs.append(_choice(rng, sorted(HELDOUT_PAIRS)))
    while len(pairs) < n:
        c, s = _choice(rng, COLOUR_NAMES), _choice(rng, SHAPES)
        if (c, s) in HELDOUT_PAIRS or any(s == p[1] for p in pairs):
            continue
        pairs.append((c, s))
    used = {c for c, _ in pairs}
    free = [c for c in COLOUR_NAMES if c not in used]
    if two_tone:
        i, j = rng.choice(len(free), 2, replace=False)
        bg: tuple[str, ...] = (free[int(i)], free[int(j)])
        split_dir: str | None = _choice(rng, ("vertical", "horizontal"))
    else:
        bg, split_dir = (_choice(rng, free),), None
    if n == 1:
        objs = [Obj(pairs[0][1], pairs[0][0], _choice(rng, SIZES), _choice(rng, POSITIONS))]
    else:
        poss = _choice(rng, (("left", "right"), ("top", "bottom")))
        if rng.random() < 0.5:
            poss = poss[::-1]
        sizes = ["small", "small"]
        r = rng.random()
        if r < 0.5:
            sizes[int(r < 0.25)] = "large"
        objs = [Obj(s, c, z, p) for (c, s), z, p in zip(pairs, sizes, poss)]
    return Scene(bg, _sorted(objs), split_dir)


# --------------------------------------------------------------------------------- rendering
@dataclass
class _Jitter:
    aa: bool
    colour: np.ndarray  # (8, 3) int offsets
    dxy: np.ndarray  # (5, 2) px offsets per position (at 128 px)
    d: dict  # size -> (5,) px extent per position
    star_inner: float
    tri_ratio: float


def _jitter(rng: np.random.Generator | None) -> _Jitter:
    """Draws a fixed set of numbers in a fixed order, whatever the scene, so that two scenes
    rendered with equally seeded generators (an edit's before / after) share every unchanged
    object's pixels."""
    if rng is None:
        return _Jitter(True, np.zeros((8, 3), int), np.zeros((5, 2)),
                       {k: np.full(5, v[0]) for k, v in SIZE_PX.items()}, 0.45, 0.9)
    aa = bool(rng.random() < 0.75)
    col = rng.integers(-12, 13, (8, 3))
    dxy = rng.uniform(-3.0, 3.0, (5, 2))
    d = {k: rng.uniform(v[1], v[2], 5) for k, v in SIZE_PX.items()}
    return _Jitter(aa, col, dxy, d, float(rng.uniform(0.40, 0.50)), float(rng.uniform(0.85, 1.0)))


def _rgb(name: str, jit: _Jitter) -> np.ndarray:
    i = COLOUR_NAMES.index(name)
    return np.clip(np.array(COLOURS[name]) + jit.colour[i], 0, 255).astype(np.float32)


def shape_points(shape: str, cx: float, cy: float, d: float, star_inner: float = 0.45,
                 tri_ratio: float = 0.9, rotation: float = 0.0, aspect: float = 1.0):
    """Polygon (list of (x, y)) or ``None`` for a circle; bounding box centred on (cx, cy)."""
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(-d / 2, -d / 2), (d / 2, -d / 2), (d / 2, d / 2), (-d / 2, d / 2)]
    elif shape == "diamond":
        pts = [(0, -d / 2), (d / 2, 0), (0, d / 2), (-d / 2, 0)]
    elif shape == "triangle":
        h = d * tri_ratio
        pts = [(0, -h / 2), (d / 2, h / 2), (-d / 2, h / 2)]
    elif shape == "star":
        big = d / (2 * math.sin(math.radians(72)))
        off = big * (1 - math.cos(math.radians(36))) / 2
        pts = []
        for k in range(10):
            a = math.radians(-90 + 36 * k)
            rr = big if k % 2 == 0 else big * star_inner
            pts.append((rr * math.cos(a), rr * math.sin(a) + off))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    if rotation:
        ca, sa = math.cos(rotation), math.sin(rotation)
        pts = [(x * ca - y * sa, x * sa + y * ca) for x, y in pts]
    return [(cx + x * aspect, cy + y) for x, y in pts]


def shape_alpha(shape: str, cx: float, cy: float, d: float, aa: bool = True, **kw):
    """Coverage of a shape: (alpha (h, w) float32 in [0, 1], x0, y0) of a patch around it.

    Drawn at 4x with ``ImageDraw`` and box-downsampled (anti-aliased); thresholded at 0.5 when
    ``aa`` is off."""
    ext = d * max(1.0, kw.get("aspect", 1.0)) * 0.6 + 2
    x0, y0 = int(math.floor(cx - ext)), int(math.floor(cy - ext))
    x1, y1 = int(math.ceil(cx + ext)), int(math.ceil(cy + ext))
    w, h = x1 - x0, y1 - y0
    S = 4
    im = Image.new("L", (w * S, h * S), 0)
    dr = ImageDraw.Draw(im)
    pts = shape_points(shape, (cx - x0) * S, (cy - y0) * S, d * S, **kw)
    if pts is None:
        r = d * S / 2
        ccx, ccy = (cx - x0) * S, (cy - y0) * S
        dr.ellipse([ccx - r, ccy - r, ccx + r, ccy + r], fill=255)
    else:
        dr.polygon(pts, fill=255)
    a = np.asarray(im.resize((w, h), Image.BOX), dtype=np.float32) / 255.0
    if not aa:
        a = (a >= 0.5).astype(np.float32)
    return a, x0, y0


def object_geometry(obj: Obj, size: int = 128, jit: _Jitter | None = None) -> tuple[float, float, float]:
    """(cx, cy, d) in pixels of an image ``size`` wide: the bounding-box centre and extent."""
    jit = jit or _jitter(None)
    k = POSITIONS.index(obj.position)
    d = float(jit.d[obj.size][k])
    ax, ay = ANCHORS[obj.position]
    r = d / 2
    cx = min(max(ax * 128 + jit.dxy[k, 0], r + MARGIN), 128 - r - MARGIN)
    cy = min(max(ay * 128 + jit.dxy[k, 1], r + MARGIN), 128 - r - MARGIN)
    s = size / 128
    return cx * s, cy * s, d * s


def render(scene: Scene, size: int = 128, rng: np.random.Generator | None = None) -> Image.Image:
    """The scene as an RGB image. With ``rng``: colours jittered (+-12 per channel), sizes and
    positions jittered, anti-aliasing on 75 % of the time."""
    jit = _jitter(rng)
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = _rgb(scene.background[0], jit).astype(np.uint8)
    if len(scene.background) == 2:
        half = size // 2
        if scene.split == "horizontal":
            canvas[half:] = _rgb(scene.background[1], jit).astype(np.uint8)
        else:
            canvas[:, half:] = _rgb(scene.background[1], jit).astype(np.uint8)
    for obj in scene.objects:
        cx, cy, d = object_geometry(obj, size, jit)
        a, x0, y0 = shape_alpha(obj.shape, cx, cy, d, jit.aa, star_inner=jit.star_inner,
                                tri_ratio=jit.tri_ratio)
        h, w = a.shape
        # clip the patch to the canvas
        ax0, ay0 = max(0, -x0), max(0, -y0)
        bx0, by0 = max(0, x0), max(0, y0)
        bx1, by1 = min(size, x0 + w), min(size, y0 + h)
        a = a[ay0:ay0 + by1 - by0, ax0:ax0 + bx1 - bx0, None]
        reg = canvas[by0:by1, bx0:bx1].astype(np.float32)
        canvas[by0:by1, bx0:bx1] = np.rint(reg * (1 - a) + _rgb(obj.colour, jit) * a).astype(np.uint8)
    return Image.fromarray(canvas, "RGB")


# ------------------------------------------------------------------------------------- text
def _a(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def bg_phrase(scene: Scene) -> str:
    """"a blue background" / "a red and yellow background"."""
    return _a(" and ".join(scene.background) + " background")


def bg_answer(scene: Scene) -> str:
    return _cap(" and ".join(scene.background)) + "."


def obj_phrase(o: Obj, size: bool = False, position: bool = False) -> str:
    s = _a(f"{o.size + ' ' if size else ''}{o.colour} {o.shape}")
    return s + (" " + POS_PHRASE[o.position] if position else "")


def _objs_phrase(scene: Scene, size: bool, position: bool) -> str:
    return " and ".join(obj_phrase(o, size, position) for o in scene.objects)


CAPTION_TEMPLATES = (
    "{objs} on {bg}.",
    "{objs_full}, on {bg}.",
    "There is {objs_pos}. The background is {bgw}.",
    "The image shows {objs_full} on {bg}.",
    "{Bg} with {objs_pos}.",
    "A picture of {objs} on {bg}.",
)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption; several templates ("A red star on a blue background.", "There is ...")."""
    t = _choice(rng, CAPTION_TEMPLATES)
    return _cap(t.format(objs=_objs_phrase(scene, False, len(scene.objects) > 1),
                         objs_full=_objs_phrase(scene, True, True),
                         objs_pos=_objs_phrase(scene, False, True),
                         bg=bg_phrase(scene), Bg=_cap(bg_phrase(scene)),
                         bgw=" and ".join(scene.background)))


QUESTION_TEMPLATES = {
    "shape": ("What shape is in the image?", "What shapes are in the image?", "Which shape do you see?",
              "What shape is shown?"),
    "colour": ("What colour is the {shape}?", "What color is the {shape}?", "Which colour is the {shape}?",
               "What is the colour of the {shape}?", "What is the color of the {shape}?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?",
              "How many objects can you see?", "Count the shapes."),
    "position": ("Where is the {shape}?", "Where is the {colour} {shape}?", "Where in the image is the {shape}?"),
    "yesno": ("Is there {q}?", "Is there {q} in the image?", "Do you see {q}?", "Does the image contain {q}?"),
    "background": ("What colour is the background?", "What color is the background?",
                   "What is the background colour?", "What is the background color?"),
    "size": ("Is the {shape} small or large?", "How big is the {shape}?", "Is the {shape} large or small?"),
    "caption": ("Describe the image.", "What is in the image?", "Write a short caption for this image.",
                "Describe this picture.", "What do you see?"),
}
QUESTION_WEIGHTS = {"shape": 3, "colour": 3, "count": 1, "position": 2, "yesno": 3, "background": 2,
                    "size": 1, "caption": 3}
NUMBERS = {1: "One", 2: "Two", 3: "Three"}
POS_ANSWER = {p: _cap(v) + "." for p, v in POS_PHRASE.items()}


def _target(scene: Scene, rng: np.random.Generator, split: str) -> int:
    """The object the text is about: a held-out pair in the held-out split."""
    idx = list(range(len(scene.objects)))
    if split == "heldout":
        idx = [i for i in idx if is_heldout_pair(scene.objects[i].colour, scene.objects[i].shape)] or idx
    return _choice(rng, idx)


def _absent_pair(scene: Scene, rng: np.random.Generator, split: str, near: Obj) -> tuple[str, str]:
    """A (colour, shape) not in the scene, differing from ``near`` in one attribute."""
    present = {(o.colour, o.shape) for o in scene.objects}
    while True:
        if rng.random() < 0.5:
            c, s = _choice(rng, COLOUR_NAMES), near.shape
        else:
            c, s = near.colour, _choice(rng, SHAPES)
        if (c, s) not in present and _pair_ok(c, s, split):
            return c, s


def answer(scene: Scene, kind: str, target: int | None = None, query: tuple[str, str] | None = None,
           rng: np.random.Generator | None = None) -> str:
    """The expected answer to a question of ``kind`` (``rng`` only for captions)."""
    o = scene.objects[target] if target is not None else None
    if kind == "shape":
        return _cap(" and ".join(_a(x.shape) for x in scene.objects)) + "."
    if kind == "colour":
        return _cap(o.colour) + "."
    if kind == "count":
        return NUMBERS[len(scene.objects)] + "."
    if kind == "position":
        return POS_ANSWER[o.position]
    if kind == "yesno":
        return "Yes." if any((x.colour, x.shape) == tuple(query) for x in scene.objects) else "No."
    if kind == "background":
        return bg_answer(scene)
    if kind == "size":
        return _cap(o.size) + "."
    if kind == "caption":
        return caption(scene, rng if rng is not None else np.random.default_rng(0))
    raise ValueError(f"unknown question kind {kind!r}")


def ask(scene: Scene, rng: np.random.Generator, split: str = "train", kind: str | None = None) -> dict:
    """A question about ``scene``: {"kind", "question", "answer", "target", "query"}."""
    if kind is None:
        kinds = list(QUESTION_WEIGHTS)
        p = np.array([QUESTION_WEIGHTS[k] for k in kinds], float)
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    t = _choice(rng, QUESTION_TEMPLATES[kind])
    target = _target(scene, rng, split)
    o = scene.objects[target]
    query = None
    if kind == "yesno":
        query = (o.colour, o.shape) if rng.random() < 0.5 else _absent_pair(scene, rng, split, o)
        q = t.format(q=_a(f"{query[0]} {query[1]}"))
    else:
        q = t.format(shape=o.shape, colour=o.colour)
    uses_target = kind in ("colour", "position", "size", "yesno")
    return {"kind": kind, "question": q, "answer": answer(scene, kind, target, query, rng),
            "target": target if uses_target else None, "query": list(query) if query else None}


def _perturb(scene: Scene, rng: np.random.Generator, split: str, attr: str, target: int) -> Scene:
    """``scene`` with one attribute of one object (or the background) changed, validly."""
    objs = [replace(o) for o in scene.objects]
    o = objs[target]
    bgset = set(scene.background)
    for _ in range(200):
        if attr == "colour":
            c = _choice(rng, COLOUR_NAMES)
            if c != o.colour and c not in bgset and _pair_ok(c, o.shape, split):
                objs[target] = replace(o, colour=c)
                break
        elif attr == "shape":
            s = _choice(rng, SHAPES)
            if all(s != x.shape for x in objs) and _pair_ok(o.colour, s, split):
                objs[target] = replace(o, shape=s)
                break
        elif attr == "background":
            cs = [c for c in COLOUR_NAMES if c not in {x.colour for x in objs}]
            new = tuple(_choice(rng, cs) for _ in scene.background)
            if new != scene.background and len(set(new)) == len(new):
                return Scene(new, objs, scene.split)
        elif attr == "size":
            big = "small" if o.size == "large" else "large"
            if big == "large" and any(x.size == "large" for i, x in enumerate(objs) if i != target):
                objs[(target + 1) % len(objs)] = replace(objs[(target + 1) % len(objs)], size="small")
            objs[target] = replace(o, size=big)
            break
        elif attr == "position":
            if len(objs) == 2:  # swap the two positions
                objs[0], objs[1] = replace(objs[0], position=objs[1].position), replace(objs[1], position=objs[0].position)
                break
            p = _choice(rng, POSITIONS)
            if p != o.position:
                objs[target] = replace(o, position=p)
                break
        else:
            raise ValueError(attr)
    else:
        raise RuntimeError(f"cannot perturb {attr} of {scene}")
    return Scene(scene.background, _sorted(objs), scene.split)


def wrong_answer(scene: Scene, q: dict, rng: np.random.Generator, split: str = "train") -> str:
    """A plausible wrong answer of the same kind (never mentioning a held-out pair in train)."""
    kind, t = q["kind"], q["target"] if q["target"] is not None else 0
    if kind == "yesno":
        return "No." if q["answer"] == "Yes." else "Yes."
    if kind == "count":
        return NUMBERS[2 if len(scene.objects) == 1 else 1] + "."
    if kind == "caption":
        attr = _choice(rng, ("colour", "shape", "background"))  # named by every caption template
        return caption(_perturb(scene, rng, split, attr, t), rng)
    attr = {"shape": "shape", "colour": "colour", "position": "position", "background": "background",
            "size": "size"}[kind]
    if kind == "shape":
        t = _choice(rng, range(len(scene.objects)))
    bad = _perturb(scene, rng, split, attr, t)
    if kind == "position" and len(scene.objects) == 2:
        return POS_ANSWER[scene.objects[1 - t].position]
    return answer(bad, kind, t, None)


# ------------------------------------------------------------------------- text-to-image
T2I_TEMPLATES = (
    "{objs} on {bg}",
    "Draw {objs} on {bg}.",
    "Generate an image of {objs} on {bg}.",
    "Please draw {objs} on {bg}.",
    "Create a picture of {objs} on {bg}.",
    "Paint {objs} on {bg}.",
    "Show me {objs} on {bg}.",
)


def spec_of(scene: Scene, named: list[set[str]] | None = None) -> dict:
    """A generation spec: the background and each object's shape, colour plus the named extras."""
    named = named or [{"size", "position"}] * len(scene.objects)
    return {"background": list(scene.background), "split": scene.split,
            "objects": [{"shape": o.shape, "colour": o.colour, **{k: getattr(o, k) for k in sorted(n)}}
                        for o, n in zip(scene.objects, named)]}


def sample_t2i(rng: np.random.Generator, split: str = "train") -> dict:
    """{"prompt", "scene", "spec"}: a prompt, the scene to draw (plain background; unnamed
    attributes at their defaults) and the spec of what the prompt names."""
    n = 1 if rng.random() < 0.8 else 2
    sc = sample_scene(rng, split, n, background="plain")
    if n == 1:
        o = sc.objects[0]
        name_size, name_pos = rng.random() < 0.4, rng.random() < 0.4
        if not name_size:
            o.size = "large"
        if not name_pos:
            o.position = "centre"
        objs = obj_phrase(o, name_size, name_pos)
        named = [{k for k, v in (("size", name_size), ("position", name_pos)) if v}]
    else:
        for o in sc.objects:
            o.size = "small"
        objs = _objs_phrase(sc, False, True)
        named = [{"position"}, {"position"}]
    t = _choice(rng, T2I_TEMPLATES)
    prompt = t.format(objs=objs, bg=bg_phrase(sc))  # the bare prompt stays lower-case
    return {"prompt": prompt, "scene": sc, "spec": spec_of(sc, named)}


# ----------------------------------------------------------------------------------- edits
EDIT_TEMPLATES = {
    "recolour": ("Make the {shape} {colour}.", "Change the colour of the {shape} to {colour}.",
                 "Change the color of the {shape} to {colour}.", "Recolour the {shape} {colour}.",
                 "Paint the {shape} {colour}."),
    "reshape": ("Turn the {shape} into {a_new}.", "Replace the {shape} with {a_new}.",
                "Change the {shape} to {a_new}."),
    "move": ("Move the {shape} to the {position}.", "Put the {shape} {pos_phrase}.",
             "Move the {shape} {pos_phrase}."),
    "add": ("Add {a_obj} on the {position}.", "Add {a_obj} {pos_phrase}.", "Put {a_obj} {pos_phrase}."),
    "remove": ("Remove the {shape}.", "Delete the {shape}.", "Take away the {shape}."),
}


def edit_key(edit: dict) -> tuple[str, str]:
    """(kind, shape) of an edit as ``HELDOUT_EDITS`` names them."""
    k = edit["kind"]
    return (k, edit["new_shape"]) if k == "reshape" else (k, edit["shape"])


def apply_edit(scene: Scene, edit: dict) -> Scene:
    """The scene after ``edit``; everything not asked for is kept.

    Edit specs: {"kind": "recolour", "shape", "colour"}, {"kind": "reshape", "shape", "new_shape"},
    {"kind": "move", "shape", "position"}, {"kind": "add", "shape", "colour", "position"} (small),
    {"kind": "remove", "shape"}.
    """
    objs = [replace(o) for o in scene.objects]
    k = edit["kind"]
    if k == "add":
        objs.append(Obj(edit["shape"], edit["colour"], edit.get("size", "small"), edit["position"]))
    else:
        i = scene.find(edit["shape"])
        if i is None:
            raise ValueError(f"the scene has no {edit['shape']}")
        if k == "recolour":
            objs[i].colour = edit["colour"]
        elif k == "reshape":
            objs[i].shape = edit["new_shape"]
        elif k == "move":
            objs[i].position = edit["position"]
        elif k == "remove":
            del objs[i]
        else:
            raise ValueError(f"unknown edit kind {k!r}")
    return Scene(scene.background, _sorted(objs), scene.split)


def edit_instruction(edit: dict, rng: np.random.Generator) -> str:
    t = _choice(rng, EDIT_TEMPLATES[edit["kind"]])
    pos = edit.get("position")
    return t.format(shape=edit["shape"], colour=edit.get("colour", ""),
                    a_new=_a(edit.get("new_shape", "")), position=pos or "",
                    pos_phrase=POS_PHRASE.get(pos, ""), a_obj=_a(f"{edit.get('colour')} {edit['shape']}"))


def sample_edit(rng: np.random.Generator, split: str = "train") -> dict:
    """{"before", "edit", "after", "instruction"}: a plain-background scene, an edit spec, the
    true edited scene and the instruction text. Train never uses ``HELDOUT_EDITS`` (nor held-out
    pairs anywhere); held-out always does (with ordinary pairs)."""
    want = _choice(rng, sorted(HELDOUT_EDITS)) if split == "heldout" else None
    kind = want[0] if want else _choice(rng, EDIT_KINDS)  # drawn once: kinds stay balanced
    for _ in range(1000):
        n = {"move": 1, "add": 1, "remove": 2}.get(kind, 1 if rng.random() < 0.7 else 2)
        sc = sample_scene(rng, "train", n, background="plain")
        bg = set(sc.background)
        shapes = {o.shape for o in sc.objects}
        if kind == "add":
            o = sc.objects[0]
            if o.position == "centre":
                continue
            new = want[1] if want else _choice(rng, SHAPES)
            c = _choice(rng, COLOUR_NAMES)
            if new in shapes or c in bg or not _pair_ok(c, new, "train"):
                continue
            edit = {"kind": "add", "shape": new, "colour": c, "position": OPPOSITE[o.position]}
        else:
            t = _choice(rng, range(n))
            o = sc.objects[t]
            if want and kind != "reshape" and o.shape != want[1]:
                continue
            if kind == "recolour":
                c = _choice(rng, COLOUR_NAMES)
                if c == o.colour or c in bg or not _pair_ok(c, o.shape, "train"):
                    continue
                edit = {"kind": kind, "shape": o.shape, "colour": c}
            elif kind == "reshape":
                new = want[1] if want else _choice(rng, SHAPES)
                if new in shapes or not _pair_ok(o.colour, new, "train"):
                    continue
                edit = {"kind": kind, "shape": o.shape, "new_shape": new}
            elif kind == "move":
                p = _choice(rng, POSITIONS)
                if p == o.position:
                    continue
                edit = {"kind": kind, "shape": o.shape, "position": p}
            else:
                edit = {"kind": "remove", "shape": o.shape}
        key = edit_key(edit)
        if (split == "train") == (key in HELDOUT_EDITS):
            continue
        after = apply_edit(sc, edit)
        if not scene_ok(after, "train"):
            continue
        return {"before": sc, "edit": edit, "after": after, "instruction": edit_instruction(edit, rng)}
    raise RuntimeError("could not sample an edit")


# ----------------------------------------------------------------------------- preferences
def sample_dpo_image(rng: np.random.Generator, split: str = "train") -> dict:
    """A t2i prompt with the right scene and a wrong one (one named attribute changed)."""
    r = sample_t2i(rng, split)
    sc = r["scene"]
    t = _target(sc, rng, split)
    attrs = ["colour", "shape", "background"] + [k for k in ("size", "position") if k in r["spec"]["objects"][t]]
    attr = _choice(rng, attrs)
    bad = _perturb(sc, rng, split, attr, t)
    return {**r, "rejected": bad, "changed": attr}


def sample_dpo_text(rng: np.random.Generator, split: str = "train") -> dict:
    sc = sample_scene(rng, split)
    q = ask(sc, rng, split)
    return {"scene": sc, **q, "rejected": wrong_answer(sc, q, rng, split)}


# -------------------------------------------------------------------------------- datasets
_JOBS = {"und": 0, "t2i": 1, "edit": 2, "dpo_img": 3, "dpo_txt": 4, "corpus": 5}


def record_rng(seed: int, job: str, index: int, split: str = "train") -> np.random.Generator:
    return np.random.default_rng([int(seed), _JOBS[job], int(index), SPLITS.index(split)])


def _save(img: Image.Image, path: Path) -> None:
    img.save(path, format="PNG", compress_level=1)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _dump(path: Path, records: list) -> None:
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n",
                    encoding="utf-8")


def write_dataset(out_dir: str | Path, *, seed: int, split: str = "train", n_und: int, n_t2i: int,
                  n_edit: int, n_dpo_img: int, n_dpo_txt: int, size: int = 128) -> dict[str, Path]:
    """Write one split: PNGs under ``out_dir/images/`` and ``und.json``, ``t2i.json``,
    ``edit.json`` (SFT), ``dpo_img.json``, ``dpo_txt.json`` (preference) plus ``meta.json``
    (per job, a list parallel to the records with the ground truth). Returns their paths
    (keys: und, t2i, edit, dpo_img, dpo_txt, meta, images).

    SFT formats: understanding "{question}<image>" -> answer; t2i "{prompt}" -> "<image_gen>";
    edit "{instruction}<image>" -> EDIT_ANSWER with images [input, output]. Image paths are
    relative to ``out_dir``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    meta: dict = {"seed": seed, "split": split, "size": size,
                  "heldout_pairs": sorted(map(list, HELDOUT_PAIRS)),
                  "heldout_edits": sorted(map(list, HELDOUT_EDITS))}
    paths: dict[str, Path] = {}

    def img(scene: Scene, name: str, seed_: int) -> str:
        _save(render(scene, size, np.random.default_rng(seed_)), img_dir / name)
        return f"images/{name}"

    recs, m = [], []
    for i in range(n_und):
        rng = record_rng(seed, "und", i, split)
        sc = sample_scene(rng, split)
        q = ask(sc, rng, split)
        p = img(sc, f"und_{i:06d}.png", int(rng.integers(2**62)))
        recs.append({"messages": [_user(q["question"] + "<image>"), _assistant(q["answer"])], "images": [p]})
        m.append({"scene": sc.to_dict(), "kind": q["kind"], "question": q["question"], "expected": q["answer"],
                  "target": q["target"], "query": q["query"]})
    meta["und"] = m
    _dump(out / "und.json", recs)
    paths["und"] = out / "und.json"

    recs, m = [], []
    for i in range(n_t2i):
        rng = record_rng(seed, "t2i", i, split)
        r = sample_t2i(rng, split)
        p = img(r["scene"], f"t2i_{i:06d}.png", int(rng.integers(2**62)))
        recs.append({"messages": [_user(r["prompt"]), _assistant("<image_gen>")], "images": [p]})
        m.append({"scene": r["scene"].to_dict(), "spec": r["spec"], "prompt": r["prompt"]})
    meta["t2i"] = m
    _dump(out / "t2i.json", recs)
    paths["t2i"] = out / "t2i.json"

    recs, m = [], []
    for i in range(n_edit):
        rng = record_rng(seed, "edit", i, split)
        e = sample_edit(rng, split)
        s = int(rng.integers(2**62))
        a = img(e["before"], f"edit_{i:06d}_in.png", s)
        b = img(e["after"], f"edit_{i:06d}_out.png", s)
        recs.append({"messages": [_user(e["instruction"] + "<image>"), _assistant(EDIT_ANSWER)],
                     "images": [a, b]})
        m.append({"before": e["before"].to_dict(), "after": e["after"].to_dict(), "edit": e["edit"],
                  "instruction": e["instruction"]})
    meta["edit"] = m
    _dump(out / "edit.json", recs)
    paths["edit"] = out / "edit.json"

    recs, m = [], []
    for i in range(n_dpo_img):
        rng = record_rng(seed, "dpo_img", i, split)
        r = sample_dpo_image(rng, split)
        s = int(rng.integers(2**62))
        a = img(r["scene"], f"dpoi_{i:06d}_c.png", s)
        b = img(r["rejected"], f"dpoi_{i:06d}_r.png", s)
        recs.append({"messages": [_user(r["prompt"])], "chosen": {"image": a}, "rejected": {"image": b}})
        m.append({"scene": r["scene"].to_dict(), "rejected_scene": r["rejected"].to_dict(), "spec": r["spec"],
                  "prompt": r["prompt"], "changed": r["changed"]})
    meta["dpo_img"] = m
    _dump(out / "dpo_img.json", recs)
    paths["dpo_img"] = out / "dpo_img.json"

    recs, m = [], []
    for i in range(n_dpo_txt):
        rng = record_rng(seed, "dpo_txt", i, split)
        r = sample_dpo_text(rng, split)
        p = img(r["scene"], f"dpot_{i:06d}.png", int(rng.integers(2**62)))
        recs.append({"messages": [_user(r["question"] + "<image>")], "images": [p],
                     "chosen": _assistant(r["answer"]), "rejected": _assistant(r["rejected"])})
        m.append({"scene": r["scene"].to_dict(), "kind": r["kind"], "question": r["question"],
                  "expected": r["answer"], "rejected": r["rejected"], "target": r["target"], "query": r["query"]})
    meta["dpo_txt"] = m
    _dump(out / "dpo_txt.json", recs)
    paths["dpo_txt"] = out / "dpo_txt.json"

    (out / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    paths["meta"] = out / "meta.json"
    paths["images"] = img_dir
    return paths


def corpus(seed: int, n: int) -> Iterator[str]:
    """``n`` text lines of the world (every word first, then every template kind at random)."""
    words = (list(COLOUR_NAMES) + list(SHAPES) + list(SIZES) + list(POSITIONS)
             + [v for v in POS_PHRASE.values()] + ["colour", "color", "Yes.", "No.", "One.", "Two.",
                                                 EDIT_ANSWER.replace("<image_gen>", "")])
    k = 0
    for w in words:
        if k >= n:
            return
        yield w
        k += 1
    i = 0
    while k < n:
        rng = record_rng(seed, "corpus", i, "train")
        i += 1
        job = int(rng.integers(4))
        if job == 0:
            sc = sample_scene(rng)
            q = ask(sc, rng)
            lines = [q["question"], q["answer"], wrong_answer(sc, q, rng)]
        elif job == 1:
            lines = [sample_t2i(rng)["prompt"]]
        elif job == 2:
            lines = [sample_edit(rng)["instruction"]]
        else:
            lines = [caption(sample_scene(rng), rng)]
        for line in lines:
            if k >= n:
                return
            yield line
            k += 1
