"""Training data: the upstream (LLaMA-Factory "sharegpt") JSON format, validated up front.

SFT file: a JSON list of records ::

    {"messages": [{"role": "user", "content": "Draw a red circle."},
                  {"role": "assistant", "content": "<image_gen>"}],
     "images": ["red_circle.png"]}

* ``messages``: optional leading ``system`` message, then alternating ``user`` / ``assistant``
  turns ending with an assistant turn (LLaMA-Factory's ``conversations`` with ``from`` / ``value``
  and the roles ``human`` / ``gpt`` are accepted too; a record-level ``system`` string as well).
* ``images``: paths relative to the JSON file, consumed in order of the placeholders:
  ``<image>`` (in a user turn) is an input image for the vision tower; ``<image_gen>`` (in an
  assistant turn, at most one per record) is an image the model must generate. An edit sample has
  an ``<image>`` input and an ``<image_gen>`` output.

Preference (DPO) file: records with a prompt (``messages`` ending with a user turn, or a
``prompt`` string) plus ``chosen`` and ``rejected`` responses. A response is an assistant text
(a string, or ``{"role": "assistant", "content": ...}``), or an image to generate:
``{"image": "a.png"}`` (assistant content ``<image_gen>``) or
``{"image": "a.png", "content": "Here it is: <image_gen>"}``. ``images`` lists the prompt's
``<image>`` inputs.

Tokenization follows the training template upstream registers for LLaMA-Factory
(``vargpt_qwen2_vl``; the special tokens are upstream ``configuration_vargpt_qwen2_vl.py``'s):
``<|im_start|>system\\n{sys}<|im_end|>\\n``, user turns
``<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n``, assistant turns
``{content}<|im_end|>``, a ``"\\n"`` separator before every later user turn. Prompt parts get
label -100; assistant content and its ``<|im_end|>`` are supervised. ``<image>`` expands to
``<|vision_start|>`` + ``<|image_pad|>`` x n + ``<|vision_end|>`` (n from the image processor),
``<image_gen>`` to ``<|image_gen_start|>`` + ``<|image_gen_pad|>`` x N + ``<|image_gen_end|>``
with N the schedule length rounded up to 128 (640 at 0.06M, 2560 at 0.25M).

Every problem (missing field, wrong roles, placeholder / image count mismatch, missing or
unreadable image) is a :class:`DataError` naming the file and the record index, raised before any
training starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from .. import schedules
from ..image_processor import ImageError, ImageProcessor, load_image, smart_resize
from .losses import IGNORE_INDEX
from ..errors import InputError

IMAGE = "<image>"
IMAGE_GEN = "<image_gen>"
DEFAULT_SYSTEM = "You are a helpful assistant."
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "system": "system"}
RESIZE_FACTOR = 1.125  # upstream: Resize(1.125 * size, LANCZOS) -> crop size


class DataError(InputError):
    """A training data file or record that cannot be used (one line, names file and record)."""


# ----------------------------------------------------------------------------------- records
@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class Response:
    """One DPO response: assistant text, or an image to generate (``image`` set)."""

    content: str
    image: Path | None = None


@dataclass
class SFTRecord:
    index: int
    system: str
    messages: list[Message]  # alternating user / assistant, ending with assistant
    images: list[Path]  # in placeholder order


@dataclass
class PreferenceRecord:
    index: int
    system: str
    prompt: list[Message]  # alternating, ending with a user turn
    images: list[Path]  # the prompt's <image> inputs
    chosen: Response
    rejected: Response


def _read_json(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path.name} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not isinstance(data, list):
        raise DataError(f"{path.name} must hold a JSON list of records, found {type(data).__name__}")
    if not data:
        raise DataError(f"{path.name} holds no records")
    return data


class _Checker:
    """Raises ``DataError`` prefixed with the file name and record index."""

    def __init__(self, path: Path, index: int):
        self.path, self.index = path, index

    def fail(self, msg: str):
        raise DataError(f"{self.path.name} record {self.index}: {msg}")

    def check(self, cond: bool, msg: str):
        if not cond:
            self.fail(msg)


def _parse_messages(c: _Checker, raw: Any, key: str) -> list[Message]:
    c.check(isinstance(raw, list), f"'{key}' must be a list of messages")
    c.check(len(raw) > 0, f"'{key}' is empty")
    out = []
    for j, m in enumerate(raw):
        c.check(isinstance(m, dict), f"message {j} is not an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        c.check(role is not None, f"message {j} has no 'role'")
        c.check(content is not None, f"message {j} has no 'content'")
        c.check(isinstance(role, str) and role in ROLE_ALIASES, f"message {j} has unknown role {role!r}")
        c.check(isinstance(content, str), f"message {j} content must be a string")
        out.append(Message(ROLE_ALIASES[role], content))
    return out


def _split_system(c: _Checker, rec: dict, msgs: list[Message]) -> tuple[str, list[Message]]:
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        c.fail("'system' must be a string")
    if msgs and msgs[0].role == "system":
        system = msgs[0].content
        msgs = msgs[1:]
    c.check(all(m.role != "system" for m in msgs), "a system message may only come first")
    return (DEFAULT_SYSTEM if system is None else system), msgs


def _check_turns(c: _Checker, msgs: list[Message], end: str):
    c.check(len(msgs) > 0, "has no user / assistant messages")
    for j, m in enumerate(msgs):
        want = "user" if j % 2 == 0 else "assistant"
        c.check(m.role == want, f"message roles must alternate user / assistant (message {j} is {m.role})")
    c.check(msgs[-1].role == end, f"the last message must be a{'n' if end == 'assistant' else ''} {end} turn")
    for j, m in enumerate(msgs):
        if m.role == "user":
            c.check(IMAGE_GEN not in m.content, f"{IMAGE_GEN} may only appear in assistant turns (message {j})")
        else:
            c.check(IMAGE not in m.content, f"{IMAGE} may only appear in user turns (message {j})")


def _image_paths(c: _Checker, rec: dict, base: Path) -> list[Path]:
    raw = rec.get("images", [])
    if raw is None:
        raw = []
    c.check(isinstance(raw, list) and all(isinstance(p, str) for p in raw), "'images' must be a list of paths")
    return [(base / p) if not Path(p).is_absolute() else Path(p) for p in raw]


def _check_image(c: _Checker, path: Path, understanding: bool, processor: ImageProcessor | None):
    if not path.is_file():
        c.fail(f"image {path} not found")
    try:
        with Image.open(path) as im:
            im.load()
            w, h = im.size
    except Exception as e:  # PIL raises many types for bad files
        c.fail(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if understanding:
        p = processor or ImageProcessor()
        try:
            smart_resize(h, w, p.factor, p.min_pixels, p.max_pixels)
        except ImageError as e:
            c.fail(f"image {path}: {e}")


def _count(msgs: list[Message], token: str) -> int:
    return sum(m.content.count(token) for m in msgs)


def load_sft_records(path: str | Path, processor: ImageProcessor | None = None) -> list[SFTRecord]:
    """Parse and validate an SFT file; every image is opened and decoded once."""
    path = Path(path)
    base = path.parent
    out = []
    for i, rec in enumerate(_read_json(path)):
        c = _Checker(path, i)
        c.check(isinstance(rec, dict), "is not an object")
        key = "messages" if "messages" in rec else "conversations" if "conversations" in rec else None
        c.check(key is not None, "has no 'messages'")
        system, msgs = _split_system(c, rec, _parse_messages(c, rec[key], key))
        _check_turns(c, msgs, "assistant")
        images = _image_paths(c, rec, base)
        n_in, n_gen = _count(msgs, IMAGE), _count(msgs, IMAGE_GEN)
        c.check(n_gen <= 1, f"has {n_gen} {IMAGE_GEN} placeholders; at most one image is generated per sample")
        c.check(n_in + n_gen == len(images),
                f"has {n_in} {IMAGE} + {n_gen} {IMAGE_GEN} placeholders but {len(images)} images")
        kinds = _placeholder_kinds(msgs)
        for p, kind in zip(images, kinds):
            _check_image(c, p, kind == IMAGE, processor)
        out.append(SFTRecord(i, system, msgs, images))
    return out


def _parse_response(c: _Checker, raw: Any, name: str, base: Path) -> Response:
    if isinstance(raw, str):
        raw = {"role": "assistant", "content": raw}
    if isinstance(raw, list) and len(raw) == 1:  # LLaMA-Factory ranking format: [message]
        raw = raw[0]
    c.check(isinstance(raw, dict), f"'{name}' must be a text, a message or {{\"image\": path}}")
    if "image" in raw:
        img = raw["image"]
        c.check(isinstance(img, str), f"'{name}.image' must be a path")
        content = raw.get("content", IMAGE_GEN)
        c.check(isinstance(content, str), f"'{name}.content' must be a string")
        c.check(content.count(IMAGE_GEN) == 1, f"'{name}.content' must hold exactly one {IMAGE_GEN}")
        c.check(IMAGE not in content, f"'{name}' may not hold {IMAGE}")
        p = Path(img)
        return Response(content, p if p.is_absolute() else base / p)
    role = raw.get("role", raw.get("from", "assistant"))
    content = raw.get("content", raw.get("value"))
    c.check(ROLE_ALIASES.get(role) == "assistant", f"'{name}' must be an assistant message")
    c.check(isinstance(content, str), f"'{name}' has no text content")
    c.check(IMAGE_GEN not in content and IMAGE not in content,
            f"'{name}' text may not hold image placeholders (use {{\"image\": path}})")
    return Response(content)


def load_preference_records(path: str | Path, processor: ImageProcessor | None = None) -> list[PreferenceRecord]:
    """Parse and validate a preference (DPO) file."""
    path = Path(path)
    base = path.parent
    out = []
    for i, rec in enumerate(_read_json(path)):
        c = _Checker(path, i)
        c.check(isinstance(rec, dict), "is not an object")
        if "messages" in rec or "conversations" in rec:
            key = "messages" if "messages" in rec else "conversations"
            msgs = _parse_messages(c, rec[key], key)
        elif "prompt" in rec:
            c.check(isinstance(rec["prompt"], str) and rec["prompt"] != "", "'prompt' must be a non-empty string")
            msgs = [Message("user", rec["prompt"])]
        else:
            c.fail("has no 'messages' or 'prompt'")
        system, msgs = _split_system(c, rec, msgs)
        _check_turns(c, msgs, "user")
        for name in ("chosen", "rejected"):
            c.check(name in rec, f"has no '{name}'")
        chosen = _parse_response(c, rec["chosen"], "chosen", base)
        rejected = _parse_response(c, rec["rejected"], "rejected", base)
        c.check((chosen.image is None) == (rejected.image is None),
                "'chosen' and 'rejected' must both be texts or both be images")
        images = _image_paths(c, rec, base)
        n_in = _count(msgs, IMAGE)
        c.check(_count(msgs, IMAGE_GEN) == 0, f"the prompt may not hold {IMAGE_GEN}")
        c.check(n_in == len(images), f"has {n_in} {IMAGE} placeholders but {len(images)} images")
        for p in images:
            _check_image(c, p, True, processor)
        for r in (chosen, rejected):
            if r.image is not None:
                _check_image(c, r.image, False, processor)
        out.append(PreferenceRecord(i, system, msgs, images, chosen, rejected))
    return out


def _placeholder_kinds(msgs: list[Message]) -> list[str]:
    """``<image>`` / ``<image_gen>`` placeholders in order of appearance."""
    kinds = []
    for m in msgs:
        s = m.content
        pos = 0
        while True:
            a, b = s.find(IMAGE, pos), s.find(IMAGE_GEN, pos)
            if a < 0 and b < 0:
                break
            if b < 0 or (0 <= a < b):
                kinds.append(IMAGE)
                pos = a + len(IMAGE)
            else:
                kinds.append(IMAGE_GEN)
                pos = b + len(IMAGE_GEN)
    return kinds


# ------------------------------------------------------------------------------- encoding
@dataclass
class Sample:
    """One tokenized training sequence (B = 1)."""

    input_ids: np.ndarray  # (T,) int32
    labels: np.ndarray  # (T,) int32, IGNORE_INDEX on prompt parts
    images: list[Path] = field(default_factory=list)  # understanding inputs, in order
    grids: list[tuple[int, int, int]] = field(default_factory=list)  # their (t, h, w) patch grids
    gen_image: Path | None = None  # generation target
    schedule: list[tuple[int, int]] | None = None  # its scale schedule
    index: int = -1  # record index in the file

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def _oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, as the image processor sees the image."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def image_grid(path: Path, processor: ImageProcessor) -> tuple[int, int, int]:
    """The ``(t, h, w)`` patch grid the processor gives an image (without preprocessing it)."""
    w, h = _oriented_size(path)
    if processor.do_resize:
        h, w = smart_resize(h, w, processor.factor, processor.min_pixels, processor.max_pixels)
    return 1, h // processor.patch_size, w // processor.patch_size


def target_schedule(path: Path, pn: str, aspect: float | str | None = None) -> list[tuple[int, int]]:
    """Scale schedule of a generation target: the pn prefix for ``aspect`` (default: the aspect
    key nearest to the image's h/w, as upstream training picks)."""
    if aspect is None:
        w, h = _oriented_size(path)
        aspect = h / w
    return schedules.get_schedule(pn, aspect)


class Encoder:
    """Tokenizes records with the training template (see module docstring)."""

    def __init__(self, tokenizer, tokens, processor: ImageProcessor, pn: str, gen_aspect: float | str | None = None):
        self.tok = tokenizer
        self.t = tokens  # config.tokens (SpecialTokens)
        self.processor = processor
        self.pn = pn
        self.gen_aspect = gen_aspect

    def _text(self, s: str) -> list[int]:
        return list(self.tok.encode(s, add_special_tokens=False)) if s else []

    def _expand(self, s: str, images: list[Path], out: Sample) -> list[int]:
        """Encode ``s`` with its placeholders expanded; consumes ``images`` in order."""
        ids: list[int] = []
        pos = 0
        while True:
            a, b = s.find(IMAGE, pos), s.find(IMAGE_GEN, pos)
            if a < 0 and b < 0:
                ids += self._text(s[pos:])
                return ids
            is_in = b < 0 or (0 <= a < b)
            at = a if is_in else b
            ids += self._text(s[pos:at])
            path = images.pop(0)
            if is_in:
                grid = image_grid(path, self.processor)
                n = self.processor.num_image_tokens([grid])[0]
                out.images.append(path)
                out.grids.append(grid)
                ids += [self.t.vision_start_token_id] + [self.t.image_token_id] * n + [self.t.vision_end_token_id]
                pos = at + len(IMAGE)
            else:
                sched = target_schedule(path, self.pn, self.gen_aspect)
                out.gen_image, out.schedule = path, sched
                n = schedules.padded_tokens(sched)
                ids += ([self.t.image_gen_start_token_id] + [self.t.image_gen_pad_token_id] * n
                        + [self.t.image_gen_end_token_id])
                pos = at + len(IMAGE_GEN)

    def encode(self, system: str, messages: list[Message], images: list[Path], index: int = -1,
               add_generation_prompt: bool = False) -> Sample:
        """Tokens and labels of a conversation (``messages`` alternate user / assistant).

        With ``add_generation_prompt`` the messages end with a user turn (a DPO prompt).
        """
        sample = Sample(np.zeros(0, np.int32), np.zeros(0, np.int32), index=index)
        queue = list(images)
        ids: list[int] = []
        labels: list[int] = []

        def add(part: list[int], supervised: bool):
            ids.extend(part)
            labels.extend(part if supervised else [IGNORE_INDEX] * len(part))

        add(self._text(f"<|im_start|>system\n{system}<|im_end|>\n"), False)
        for j, m in enumerate(messages):
            if m.role == "user":
                sep = "\n" if j > 0 else ""
                turn = f"<|im_start|>user\n{m.content}<|im_end|>\n<|im_start|>assistant\n"
                add(self._text(sep) + self._expand(turn, queue, sample), False)
            else:
                add(self._expand(m.content, queue, sample) + [self.t.eos_token_id], True)
        sample.input_ids = np.asarray(ids, np.int32)
        sample.labels = np.asarray(labels, np.int32)
        return sample

    def encode_sft(self, rec: SFTRecord) -> Sample:
        return self.encode(rec.system, rec.messages, rec.images, rec.index)

    def encode_pair(self, rec: PreferenceRecord) -> tuple[Sample, Sample]:
        """(chosen, rejected) full sequences sharing the prompt."""
        out = []
        for r in (rec.chosen, rec.rejected):
            imgs = list(rec.images) + ([r.image] if r.image is not None else [])
            out.append(self.encode(rec.system, rec.prompt + [Message("assistant", r.content)], imgs, rec.index))
        return out[0], out[1]


# ------------------------------------------------------------------------------- images
def target_pixels(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A generation target as upstream's training transform gives it, at ``size = (H, W)``.

    Upstream (square): ``Resize(1.125 * S, LANCZOS)`` on the shorter side -> ``CenterCrop(S)`` ->
    ``ToTensor`` -> ``x * 2 - 1``. For a non-square target the side whose ratio binds is resized
    to ``1.125 x`` its target (the other keeps the aspect), which is the same rule for squares.
    Returns (H, W, 3) float32 in [-1, 1] (center crop; upstream may also crop randomly).
    """
    H, W = size
    im = load_image(path)
    w, h = im.size
    if H / h >= W / w:  # height binds
        nh = int(RESIZE_FACTOR * H)
        nw = max(int(nh * w / h), W)
    else:
        nw = int(RESIZE_FACTOR * W)
        nh = max(int(nw * h / w), H)
    im = im.resize((nw, nh), resample=Image.Resampling.LANCZOS)
    top = int(round((nh - H) / 2.0))
    left = int(round((nw - W) / 2.0))
    im = im.crop((left, top, left + W, top + H))
    x = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    return x * np.float32(2.0) - np.float32(1.0)


@dataclass
class GenTarget:
    """Cached ground truth of a generation target: bit labels and teacher-forcing inputs
    (flip strength 0), plus the raw VAE features for bitwise self-correction."""

    gt_bits: mx.array  # (1, L, 32) uint8
    x_wo_prefix: mx.array  # (1, L - 1, 32)
    features: mx.array | None = None  # (1, h, w, 32) raw VAE features
    schedule: list[tuple[int, int]] | None = None


def flip_requant(features: mx.array, schedule: list[tuple[int, int]], strength: float,
                 rng: np.random.Generator) -> tuple[mx.array, mx.array]:
    """Upstream ``BitwiseSelfCorrection.flip_requant`` (Infinity's bitwise self-correction).

    Per scale: bits of the area-downsampled residual are the labels; with
    ``p = randint(0, 100 * strength + 1) * 0.01`` each bit is flipped with probability p, the codes
    of the *flipped* bits are accumulated, so later residuals (labels) learn to correct the errors.
    Returns ``(gt_bits (1, L, 32), x_wo_prefix (1, L - 1, 32))``. ``strength=0`` equals the cached
    target. Upstream draws from numpy's / torch's global generators; here ``rng`` does.
    """
    from ..models import bsq

    def flip(bits: mx.array) -> mx.array:
        p = rng.integers(0, int(round(100 * strength)) + 1) * 0.01
        if p > 0:
            bits = bits ^ mx.array((rng.random(bits.shape) < p).astype(np.uint8))
        return bits

    bits, teacher, _ = bsq.encode_multiscale(features, schedule, flip=flip)
    return mx.concatenate([b.reshape(1, -1, b.shape[-1]) for b in bits], axis=1), teacher


def param_dtype(module) -> mx.Dtype:
    """dtype of a module's first floating parameter (float32 if none)."""
    for _, v in tree_flatten(module.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


def encode_target(model, path: Path, schedule: list[tuple[int, int]]) -> GenTarget:
    """VAE encoder + multi-scale BSQ (flip strength 0) on a target image (no gradient)."""
    from ..models import bsq

    H, W = schedules.image_size(schedule)
    x = mx.array(target_pixels(path, (H, W)))[None].astype(param_dtype(model.vae_local))
    feats = mx.stop_gradient(model.vae_local.encode_features(x))
    bits, x_wo_prefix, _ = bsq.encode_multiscale(feats, schedule)
    gt = mx.concatenate([b.reshape(b.shape[0], -1, b.shape[-1]) for b in bits], axis=1)
    mx.eval(gt, x_wo_prefix, feats)
    return GenTarget(gt, x_wo_prefix, feats, list(schedule))


def preprocess_images(processor: ImageProcessor, paths: list[Path]):
    """``(pixel_values, image_grid_thw)`` as mx / numpy, or ``(None, None)`` without images."""
    if not paths:
        return None, None
    pv, grid = processor([str(p) for p in paths])
    return mx.array(pv), grid


# ------------------------------------------------------------------------------- datasets
@dataclass
class Batchable:
    """What a loss needs for one sequence: tokens, labels, images, cached target."""

    sample: Sample
    target: GenTarget | None = None

    def arrays(self, processor: ImageProcessor, dtype=mx.float32):
        pv, grid = preprocess_images(processor, self.sample.images)
        if pv is not None:
            pv = pv.astype(dtype)
        return pv, grid


class TargetCache:
    """GT bits per (image, schedule), computed once per run (the VAE is frozen)."""

    def __init__(self):
        self._cache: dict[tuple[str, tuple], GenTarget] = {}

    def __len__(self):
        return len(self._cache)

    @staticmethod
    def key(path: Path, schedule) -> tuple[str, tuple]:
        return str(Path(path).resolve()), tuple(map(tuple, schedule))

    def __contains__(self, key: tuple[str, tuple]) -> bool:
        return key in self._cache

    def put(self, key: tuple[str, tuple], target: GenTarget) -> None:
        """Store a target encoded elsewhere (e.g. in a batch, ``nano.recipe.encode_targets_batched``)."""
        self._cache[key] = target

    def get(self, model, path: Path, schedule) -> GenTarget:
        key = self.key(path, schedule)
        if key not in self._cache:
            self._cache[key] = encode_target(model, path, schedule)
        return self._cache[key]


def prepare_targets(model, samples: list[Sample], cache: TargetCache,
                    on_progress: Callable[[int, int], None] | None = None) -> list[GenTarget | None]:
    """Encode every generation target once (``on_progress(done, total)`` after each)."""
    out = []
    total = sum(s.gen_image is not None for s in samples)
    done = 0
    for s in samples:
        if s.gen_image is None:
            out.append(None)
            continue
        out.append(cache.get(model, s.gen_image, s.schedule))
        done += 1
        if on_progress:
            on_progress(done, total)
    return out


def file_digest(path: str | Path) -> str:
    """sha256 of a data file (recorded in checkpoints; resuming on changed data warns)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
