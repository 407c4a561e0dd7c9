"""Turning request fields into library inputs: images (data URIs, uploads, local paths), OpenAI
chat messages, ``size`` -> (pn, aspect), and ``stop`` strings. Every problem is an ``APIError``
(400) with a one-line message."""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .. import api, schedules
from ..image_processor import ImageError, load_image, smart_resize
from .errors import bad_request

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


# ----------------------------------------------------------------------------------- images
def open_image_bytes(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """Decode an uploaded / inline image (EXIF orientation applied, RGB); refuse corrupt, huge or
    badly shaped ones."""
    if not data:
        raise bad_request(f"{what} is empty", "invalid_image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise bad_request(f"{what} is {im.width}x{im.height} pixels; the server accepts at most "
                                  f"{max_pixels} pixels", "image_too_large")
            im.load()
            img = load_image(im)
    except Image.DecompressionBombError:
        raise bad_request(f"{what} is too large (more than {max_pixels} pixels)", "image_too_large") from None
    except (OSError, ValueError, SyntaxError, ImageError) as e:
        raise bad_request(f"{what} is not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                          "invalid_image") from None
    try:
        smart_resize(img.height, img.width)
    except ImageError as e:
        raise bad_request(f"{what}: {e}", "invalid_image") from None
    return img


def decode_image_url(url: str, what: str, *, allow_local_files: bool, max_pixels: int) -> Image.Image:
    """An ``image_url``: a ``data:`` URI (base64), or a local path / ``file://`` URL when allowed.
    http(s) URLs are refused: the server fetches nothing."""
    url = url.strip()
    low = url[:16].lower()
    if low.startswith(("http://", "https://")):
        raise bad_request(f"{what}: the server does not fetch URLs; send the image inline as a data URI "
                          "(data:image/png;base64,...)", "image_url_not_supported")
    if low.startswith("data:"):
        m = _DATA_URI.match(url)
        if not m or not m.group("b64"):
            raise bad_request(f"{what}: expected a base64 data URI (data:image/png;base64,...)", "invalid_image_url")
        if m.group("mime") and not m.group("mime").lower().startswith("image/"):
            raise bad_request(f"{what}: the data URI is {m.group('mime')}, not an image", "invalid_image_url")
        payload = re.sub(r"\s+", "", url[m.end():])
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{what}: the data URI is not valid base64", "invalid_base64") from None
        return open_image_bytes(data, what, max_pixels)
    if "://" in url and not low.startswith("file://"):
        raise bad_request(f"{what}: unsupported URL scheme; send a data URI (data:image/png;base64,...)",
                          "invalid_image_url")
    if not allow_local_files:
        raise bad_request(f"{what}: local file paths are refused unless the server runs with --allow-local-files; "
                          "send a data URI (data:image/png;base64,...)", "local_files_not_allowed")
    path = Path(url[7:] if low.startswith("file://") else url).expanduser()
    if not path.is_file():
        raise bad_request(f"{what}: no such file {path}", "invalid_image_url")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise bad_request(f"{what}: cannot read {path}: {e.strerror or e}", "invalid_image_url") from None
    return open_image_bytes(data, what, max_pixels)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ----------------------------------------------------------------------------------- chat messages
@dataclass
class ChatInput:
    """An OpenAI ``messages`` list as ``ChatSession.start_from`` + ``send`` take it."""

    history: list[dict] = field(default_factory=list)  # template messages before the last user turn
    history_images: list[str] = field(default_factory=list)  # their image URLs, in order
    text: str = ""  # the last user turn's text
    images: list[str] = field(default_factory=list)  # ... and its image URLs


def _text_of(content, where: str, allow_images: bool) -> tuple[str, list[str]]:
    """(text, image urls) of a message's content (a string or a list of parts); text parts are joined
    with newlines and come before the images, as upstream's prompts put them."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts, urls = [], []
    for j, part in enumerate(content):
        if part.type == "text":
            if part.text is None:
                raise bad_request(f"{where}.content[{j}]: a text part needs 'text'", param=f"{where}.content")
            texts.append(part.text)
        elif part.type == "image_url":
            if not allow_images:
                raise bad_request(f"{where}.content[{j}]: images are only accepted in user messages",
                                  param=f"{where}.content")
            iu = part.image_url
            url = iu if isinstance(iu, str) else (iu.url if iu is not None else None)
            if not url:
                raise bad_request(f"{where}.content[{j}]: an image_url part needs 'image_url': {{'url': ...}}",
                                  param=f"{where}.content")
            urls.append(url)
        else:
            raise bad_request(f"{where}.content[{j}]: unsupported content part type {part.type!r} "
                              "(text and image_url are supported)", param=f"{where}.content")
    return "\n".join(texts), urls


def convert_messages(messages, image_marker: str) -> ChatInput:
    """Validate OpenAI chat messages. ``image_marker``: what an assistant reply that drew an image
    holds in the history (``<|image_gen_start|><|image_gen_end|>``, as ``ChatSession`` keeps it)."""
    if not messages:
        raise bad_request("messages must hold at least one message", "empty_messages", "messages")
    if messages[-1].role != "user":
        raise bad_request("the last message must be a user message (the server answers it)",
                          "invalid_messages", "messages")
    out = ChatInput()
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role in ("system", "developer"):
            text, _ = _text_of(m.content, where, allow_images=False)
            out.history.append({"role": "system", "content": text})
        elif m.role == "assistant":
            text, _ = _text_of(m.content, where, allow_images=False)
            if m.images:  # the reply drew an image: keep the marker ChatSession would have kept
                text += image_marker
            out.history.append({"role": "assistant", "content": text})
        elif m.role == "user":
            text, urls = _text_of(m.content, where, allow_images=True)
            if not text.strip() and not urls:
                raise bad_request(f"{where} is empty: give text or at least one image", "empty_message", where)
            if i == len(messages) - 1:
                out.text, out.images = text, urls
            else:
                content = ([{"type": "text", "text": text}] if text else []) + [{"type": "image"} for _ in urls]
                out.history.append({"role": "user", "content": content})
                out.history_images += urls
        else:
            raise bad_request(f"{where}: role {m.role!r} is not supported (system, user and assistant are; "
                              "no tools)", "unsupported_role", f"{where}.role")
    return out


# ----------------------------------------------------------------------------------- image sizes
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[x×]\s*(\d{1,5})\s*$", re.IGNORECASE)


@dataclass
class SizeChoice:
    pn: str | None  # None: the checkpoint's
    aspect: str  # "W:H" or h/w as api.make_settings takes it
    note: str | None = None  # set when the drawn size differs from the requested one


def supported_pns(model_pn: str) -> list[str]:
    """The pn settings a checkpoint draws: its own and the smaller ones (prefixes of its scale
    schedule; larger ones would need scales it was never trained on)."""
    own = schedules.PN_NUM_SCALES[model_pn]
    return [pn for pn, n in schedules.PN_NUM_SCALES.items() if n <= own]


def drawn_size(pn: str, aspect_key: float) -> tuple[int, int]:
    """(width, height) in pixels of an image at ``pn`` and tabulated aspect ``aspect_key`` (h/w)."""
    h, w = schedules.image_size(schedules.get_schedule(pn, aspect_key))
    return w, h


def choose_size(size: str | None, aspect: str | None, pn: str | None, model_pn: str) -> SizeChoice:
    """``size`` "WxH" -> the nearest supported aspect (of 15, 3:1 .. 1:3) and pn (by pixel count,
    among ``supported_pns``); explicit ``aspect`` / ``pn`` extras take precedence."""
    if pn is not None:
        try:
            pn = api.normalize_pn(pn)
        except ValueError as e:
            raise bad_request(str(e), "invalid_pn", "pn") from None
    if aspect is not None:
        try:
            api.check_aspect(aspect)
        except ValueError as e:
            raise bad_request(str(e), "invalid_aspect", "aspect") from None
    if size is None or size.strip().lower() == "auto":
        return SizeChoice(pn, aspect or "1:1")
    m = _SIZE.match(size)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise bad_request(f"size {size!r} is not WIDTHxHEIGHT (e.g. 512x512) or 'auto'", "invalid_size", "size")
    W, H = int(m.group(1)), int(m.group(2))
    if aspect is None:
        try:
            key = api.check_aspect(f"{W}:{H}")
        except ValueError:
            raise bad_request(f"size {size}: aspect ratio outside the supported range 3:1 .. 1:3",
                              "invalid_size", "size") from None
        aspect = f"{W}:{H}"
    else:
        key = api.check_aspect(aspect)
    if pn is None:
        pn = min(supported_pns(model_pn),
                 key=lambda p: abs(math.log(math.prod(drawn_size(p, key)) / (W * H))))
    w, h = drawn_size(pn, key)
    note = None
    if (w, h) != (W, H):
        note = (f"requested {W}x{H}; drawn at {w}x{h} (pn {pn}, aspect {api.aspect_label(key)}), the nearest "
                "size this model supports")
    return SizeChoice(pn, aspect, note)


# ----------------------------------------------------------------------------------- stop strings
class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a tail that could start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[:min(hits)], "", True
            return out
        if len(self.buf) <= self.hold:
            return ""
        cut = len(self.buf) - self.hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out
