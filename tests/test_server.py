"""``vargpt-mlx serve``: the OpenAI-compatible server on the fixture model, driven by the real
``openai`` client (and raw HTTP where a client would refuse to send the request).

One server runs in a thread of this process on a free loopback port for the whole module; tests
that need another setting (API key, queue limit, local files) change it on the running server and
restore it. The fixture model's weights are random: replies are gibberish and images noise; the
tests check behaviour and that the server answers exactly what the library computes. The VAE
decoder is replaced by a cheap stand-in that still depends on the codes (the real one takes
~15 s per image on a busy CPU and is checked against upstream by tests/test_verify.py).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import logging
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install -e '.[server]')")
uvicorn = pytest.importorskip("uvicorn", reason="the server extra is not installed (pip install -e '.[server]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[test]')")

import mlx.core as mx  # noqa: E402

from tests.conftest import FIXTURES  # noqa: E402
from vargpt_mlx import api  # noqa: E402
from vargpt_mlx.chat import ChatSession  # noqa: E402
from vargpt_mlx.models.vae import BSQVAE  # noqa: E402
from vargpt_mlx.server import ServerSettings, build_app  # noqa: E402
from vargpt_mlx.server import jobs as server_jobs  # noqa: E402
from vargpt_mlx.server import worker as server_worker  # noqa: E402
from vargpt_mlx.server.inputs import StopMatcher, choose_size  # noqa: E402
from vargpt_mlx.text_generation import hf_logits_processors  # noqa: E402

IMG = FIXTURES / "und_image_56x84.png"
REAL_VAE_DECODE = BSQVAE.decode
MODEL_ID = "vargpt-tiny"
MAX_BODY = 4 * 2**20
MAX_PIXELS = 4_000_000


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cheap_vae():
    def decode(self, z):
        x = mx.repeat(mx.repeat(z[..., :3] * 4.0, 16, axis=1), 16, axis=2)
        return mx.clip(x, -1.0, 1.0)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BSQVAE, "decode", decode)
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, app, worker, settings, port):
        self.app, self.worker, self.settings, self.port = app, worker, settings, port
        self.base = f"http://127.0.0.1:{port}"

    def client(self, **kw) -> "openai.OpenAI":
        kw.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.base + "/v1", max_retries=0, timeout=120, **kw)

    def request(self, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None,
                timeout: float = 120):
        """Raw HTTP (for bodies a client would not send): (status, headers, body bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def post_json(self, path: str, obj, **kw):
        return self.request("POST", path, json.dumps(obj), {"Content-Type": "application/json"}, **kw)

    def health(self) -> dict:
        return json.loads(self.request("GET", "/health")[2])

    def wait_idle(self, timeout: float = 30.0) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            h = self.health()
            if not h["busy"] and h["waiting"] == 0:
                return time.perf_counter() - t0
            time.sleep(0.05)
        raise AssertionError("the model stayed busy")


@contextlib.contextmanager
def running_server(model, settings: ServerSettings):
    """``build_app`` + uvicorn in a thread on a free loopback port, for the duration."""
    app, worker = build_app(model, settings)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        t0 = time.time()
        while not srv.started:
            assert thread.is_alive() and time.time() - t0 < 60, "the server did not start"
            time.sleep(0.05)
        yield Running(app, worker, settings, port)
    finally:
        srv.should_exit = True
        thread.join(10)
        worker.stop()


@pytest.fixture(scope="module")
def server(model_dir, cheap_vae):
    settings = ServerSettings(model_id=MODEL_ID, max_body_bytes=MAX_BODY, max_image_pixels=MAX_PIXELS)
    with running_server(model_dir, settings) as running:
        yield running


@pytest.fixture(scope="module")
def pipe(model_dir, cheap_vae):
    """The same model loaded here, for the library's own answers."""
    return api.load(model_dir)


def data_uri(path: Path | bytes) -> str:
    raw = path if isinstance(path, bytes) else Path(path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def png(size, color=0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (color, color, color)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def library_reply(pipe, text, images=(), **opts) -> tuple[str, object]:
    s = ChatSession(pipe, **opts)
    out = "".join(p for p in s.send(text, images) if isinstance(p, str))
    return out, s.last_turn


# ----------------------------------------------------------------------------- basics
def test_models_health_and_page(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert server.health()["status"] == "ok"
    status, headers, body = server.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"vargpt-mlx" in body
    for asset in ("/static/app.js", "/static/style.css"):
        assert server.request("GET", asset)[0] == 200
    # nothing on the page comes from outside
    for name in ("index.html", "app.js", "style.css"):
        text = (Path(api.__file__).parent / "server" / "static" / name).read_text()
        assert "http://" not in text and "https://" not in text, name


def test_chat_plain_matches_library(server, pipe, caplog):
    caplog.set_level(logging.INFO, logger="vargpt_mlx.server")
    r = server.client().chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hello there"}],
                                                max_tokens=8)
    text, stats = library_reply(pipe, "Hello there", max_tokens=8)  # greedy, as the server's default
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (stats.prompt_tokens, 8)
    assert r.usage.total_tokens == stats.prompt_tokens + 8 and r.model == MODEL_ID
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "vargpt_mlx.server"]
    assert any(ln.startswith("POST /v1/chat/completions 200 tokens ") and ln.endswith("s") for ln in lines), lines
    r = server.client().chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hello there"}],
                                                max_tokens=8, extra_body={"repetition_penalty": 1.5})
    assert r.choices[0].message.content == library_reply(
        pipe, "Hello there", max_tokens=8, logits_processors=hf_logits_processors(1.5))[0]


def test_chat_streaming(server):
    c = server.client()
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Tell me a story."}]
    whole = c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=12, temperature=0.9, seed=5)
    chunks = list(c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=12, temperature=0.9, seed=5,
                                            stream=True, stream_options={"include_usage": True}))
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert len([d for d in deltas if d]) > 1  # token by token, not one piece
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # the wire format: server-sent events ending with [DONE]
    status, headers, body = server.post_json("/v1/chat/completions", {"messages": msgs, "max_tokens": 3,
                                                                      "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_chat_with_image_matches_library(server, pipe):
    r = server.client().chat.completions.create(model=MODEL_ID, max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": data_uri(IMG)}}]}])
    text, stats = library_reply(pipe, "What is in this picture?", [IMG], max_tokens=6)
    assert r.choices[0].message.content == text
    assert r.usage.prompt_tokens == stats.prompt_tokens
    _, plain = library_reply(pipe, "What is in this picture?", max_tokens=1)
    assert stats.prompt_tokens > plain.prompt_tokens + 2  # the image's tokens are in the prompt


def test_local_files_only_when_allowed(server, pipe):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Describe."},
                                         {"type": "image_url", "image_url": {"url": str(IMG)}}]}]
    status, _, body = server.post_json("/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
    assert status == 400 and json.loads(body)["error"]["code"] == "local_files_not_allowed"
    server.settings.allow_local_files = True
    try:
        r = server.client().chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=4)
    finally:
        server.settings.allow_local_files = False
    assert r.choices[0].message.content == library_reply(pipe, "Describe.", [IMG], max_tokens=4)[0]


def test_start_from_prefills_the_whole_conversation(pipe):
    """A stateless client's history (system, user with image, assistant, user): the session
    prefills exactly what the chat template renders, images in place, then continues as usual."""
    from tests.test_chat import assert_matches_fresh, collapse_pads, rendered

    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]},
               {"role": "assistant", "content": "A picture."}]
    s = ChatSession(pipe, max_tokens=3)
    s.start_from(history, [IMG])
    list(s.send("And now?"))
    assert_matches_fresh(pipe, s, [IMG])
    assert collapse_pads(pipe.tokenizer.decode(s.token_ids + s._pending)) == rendered(pipe, s)
    assert s.messages[:3] == history
    list(s.send("More."))  # later turns continue on the cache
    assert_matches_fresh(pipe, s, [IMG])


def test_chat_stop_sequences(server):
    c = server.client()
    msgs = [{"role": "user", "content": "Count with me."}]
    full = c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=16).choices[0].message.content
    stop = full[5:7]
    assert stop and full.find(stop) >= 0
    r = c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=16, stop=[stop, "\u2603never"])
    assert r.choices[0].message.content == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=16, stop=stop, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == full[:full.find(stop)]


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END", "xy"])
    out = [m.feed(p) for p in ["ab", "cE", "N", "x", "D", "zzz"]]
    assert "".join(out) + m.flush() == "abcENxDzzz" and not m.stopped
    m = StopMatcher(["END"])
    assert m.feed("abcE") + m.feed("NDtail") == "abc" and m.stopped and m.feed("more") == ""


@pytest.fixture
def draws_image(monkeypatch, pipe):
    """The random model never picks <|image_gen_start|> by itself: force it at the second step."""
    from tests.test_chat import Steer

    tok = pipe.config.tokens

    class Drawing(ChatSession):
        def __init__(self, pipeline, *a, logits_processors=(), **kw):
            steer = Steer(pipeline.config.llm.vocab_size,
                          ban=(tok.vision_start_token_id, tok.image_token_id, tok.video_token_id))
            steer.turn({1: tok.image_gen_start_token_id})
            super().__init__(pipeline, *a, logits_processors=[*logits_processors, steer], **kw)

    monkeypatch.setattr(server_jobs, "ChatSession", Drawing)


def test_chat_draws_image_inline(server, draws_image):
    c = server.client()
    msgs = [{"role": "user", "content": "Draw a cat."}]
    r = c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=8, seed=7)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 2
    (img,) = msg.images  # OpenRouter's shape: message.images[i].image_url.url is a data URI
    assert img["type"] == "image_url" and img["seed"] == 7 and (img["width"], img["height"]) == (256, 256)
    url = img["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    im = decode_png(url.split(",", 1)[1])
    assert im.size == (256, 256) and im.mode == "RGB"
    stream = list(c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=8, seed=7, stream=True))
    drawn = [d for ch in stream if ch.choices for d in (ch.choices[0].delta.model_extra or {}).get("images", [])]
    assert [d["image_url"]["url"] for d in drawn] == [url]  # same seed, same image
    # the reply goes back as history (with its images field) and the chat continues
    follow = msgs + [{"role": "assistant", "content": msg.content, "images": [{"type": "image_url"}]},
                     {"role": "user", "content": "Nice."}]
    assert server.post_json("/v1/chat/completions", {"messages": follow, "max_tokens": 2})[0] == 200
    assert not list(server.worker.pipeline.path.glob("*.png"))  # nothing left in the model directory


# ----------------------------------------------------------------------------- images
def test_image_generation_seeds_and_metadata(server, caplog):
    caplog.set_level(logging.INFO, logger="vargpt_mlx.server")
    c = server.client()
    pair = c.images.generate(prompt="a red fox", n=2, extra_body={"seed": 3})
    a, b = (decode_png(d.b64_json) for d in pair.data)
    assert [d.seed for d in pair.data] == [3, 4] and pair.size == "256x256"
    assert a.format == "PNG" and a.size == (256, 256)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    again = c.images.generate(prompt="a red fox", response_format="b64_json", extra_body={"seed": 3})
    assert np.array_equal(np.asarray(decode_png(again.data[0].b64_json)), np.asarray(a))  # a seed reproduces
    assert again.data[0].b64_json == c.images.generate(prompt="a red fox", extra_body={"seed": 3}).data[0].b64_json
    second = c.images.generate(prompt="a red fox", extra_body={"seed": 4, "cfg": 3, "tau": 0.5, "top_k": 900,
                                                               "top_p": 0.97})
    assert np.array_equal(np.asarray(decode_png(second.data[0].b64_json)), np.asarray(b))  # image i = seed + i
    params = json.loads(a.info["parameters"])
    assert a.info["prompt"] == "a red fox" and a.info["seed"] == "3" and a.info["mode"] == "text-to-image"
    assert params["cfg"] == 3.0 and params["tau"] == 0.5 and params["pn"] == "0.06M" and params["n"] == 2
    assert pair.model_extra["vargpt"]["scales"] == 7
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "vargpt_mlx.server"]
    assert any(ln.startswith("POST /v1/images/generations 200 images 2 scales 7 ") for ln in lines), lines


def test_image_size_maps_to_nearest_supported(server):
    r = server.client().images.generate(prompt="a wide valley", size="1024x576", extra_body={"seed": 1})
    im = decode_png(r.data[0].b64_json)
    assert r.size == f"{im.width}x{im.height}" and im.width > im.height  # 16:9 at the fixture's pn (0.06M)
    info = r.model_extra["vargpt"]
    assert info["aspect"] == "16:9" or info["aspect"] == "2:1" or info["aspect"] == "7:4"
    assert info["pn"] == "0.06M" and "requested 1024x576" in info["note"]
    # the checkpoint's own pn is the largest it draws; smaller ones are prefixes of its schedule
    assert choose_size("256x256", None, None, "0.25M").pn == "0.06M"
    assert choose_size("4096x4096", None, None, "0.25M").pn == "0.25M"
    assert choose_size("512x512", None, None, "0.25M").note is None
    assert choose_size(None, None, None, "0.25M").pn is None


def test_image_edit_matches_library(server, pipe):
    with open(IMG, "rb") as f:
        r = server.client().images.edit(image=f, prompt="make it blue", n=1, extra_body={"seed": 1})
    im = decode_png(r.data[0].b64_json)
    ref = api.edit_image(pipe, Image.open(IMG), "make it blue", seed=1)[0]
    assert np.array_equal(np.asarray(im), np.asarray(ref))
    assert im.info["mode"] == "edit" and im.info["prompt"] == "make it blue" and im.info["seed"] == "1"
    assert im.info["input_size"] == "84x56"


# ----------------------------------------------------------------------------- auth, bad input
def test_api_key(server):
    server.settings.api_key = "s3cret"
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(api_key="wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        status, _, body = server.request("POST", "/v1/images/generations", "{}", {"Content-Type": "application/json"})
        assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
        assert server.request("GET", "/health")[0] == 200  # /health is open
        assert server.request("GET", "/")[0] == 200  # the page's files hold no data; the page asks for the key
        assert [m.id for m in server.client(api_key="s3cret").models.list().data] == [MODEL_ID]
    finally:
        server.settings.api_key = None


def _chat(**kw):
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


def _user(*parts):
    return {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 2}


def _img(url):
    return {"type": "image_url", "image_url": {"url": url}}


TRUNCATED_PNG = FIXTURES.joinpath("und_image_56x84.png").read_bytes()[:120]
CHAT, GEN, EDIT = "/v1/chat/completions", "/v1/images/generations", "/v1/images/edits"

BAD_JSON = [  # (name, path, body, status, error code)
    ("malformed JSON", CHAT, b'{"messages": [', 400, "invalid_json"),
    ("empty body", CHAT, b"", 400, "invalid_json"),
    ("JSON array", CHAT, b"[1, 2]", 400, "invalid_json"),
    ("no messages", CHAT, {"max_tokens": 3}, 400, "invalid_value"),
    ("messages not a list", CHAT, {"messages": "hi"}, 400, "invalid_value"),
    ("empty messages", CHAT, {"messages": []}, 400, "empty_messages"),
    ("empty user message", CHAT, {"messages": [{"role": "user", "content": " "}]}, 400, "empty_message"),
    ("last message not user", CHAT, {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_messages"),
    ("tool role", CHAT, {"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "hi"}]}, 400,
     "unsupported_role"),
    ("max_tokens a string", CHAT, _chat(max_tokens="many"), 400, "invalid_value"),
    ("max_tokens 0", CHAT, _chat(max_tokens=0), 400, "invalid_value"),
    ("max_tokens past context", CHAT, _chat(max_tokens=10**6), 400, "invalid_value"),
    ("temperature 5", CHAT, _chat(temperature=5), 400, "invalid_value"),
    ("top_p 0", CHAT, _chat(top_p=0), 400, "invalid_value"),
    ("stream a string", CHAT, _chat(stream="yes"), 400, "invalid_value"),
    ("n 2", CHAT, _chat(n=2), 400, "invalid_value"),
    ("stop list too long", CHAT, _chat(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
    ("tools", CHAT, _chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter"),
    ("unknown part type", CHAT, _user({"type": "input_audio", "input_audio": {}}), 400, "invalid_request"),
    ("http image URL", CHAT, _user(_img("https://example.com/cat.png")), 400, "image_url_not_supported"),
    ("local path without --allow-local-files", CHAT, _user(_img("/etc/hostname")), 400, "local_files_not_allowed"),
    ("image not base64", CHAT, _user(_img("data:image/png;base64,@@not base64@@")), 400, "invalid_base64"),
    ("data URI not base64-encoded", CHAT, _user(_img("data:image/png,abc")), 400, "invalid_image_url"),
    ("data URI of text", CHAT, _user(_img("data:text/plain;base64,aGVsbG8=")), 400, "invalid_image_url"),
    ("corrupt image", CHAT, _user(_img("data:image/png;base64," + base64.b64encode(b"hello").decode())), 400,
     "invalid_image"),
    ("truncated image", CHAT, _user(_img(data_uri(TRUNCATED_PNG))), 400, "invalid_image"),
    ("huge image", CHAT, _user(_img(data_uri(png((2100, 2100))))), 400, "image_too_large"),
    ("tiny image", CHAT, _user(_img(data_uri(png((10, 10))))), 400, "invalid_image"),
    ("prompt past the context", CHAT, {"messages": [{"role": "user", "content": "word " * 40000}]}, 400,
     "invalid_request"),
    ("image prompt missing", GEN, {"n": 1}, 400, "invalid_value"),
    ("image prompt empty", GEN, {"prompt": "  "}, 400, "invalid_value"),
    ("n 0", GEN, {"prompt": "x", "n": 0}, 400, "invalid_value"),
    ("n 11", GEN, {"prompt": "x", "n": 11}, 400, "invalid_value"),
    ("n a string", GEN, {"prompt": "x", "n": "2"}, 400, "invalid_value"),
    ("size not WxH", GEN, {"prompt": "x", "size": "big"}, 400, "invalid_size"),
    ("size 6:1", GEN, {"prompt": "x", "size": "3000x500"}, 400, "invalid_size"),
    ("response_format url", GEN, {"prompt": "x", "response_format": "url"}, 400, "unsupported_parameter"),
    ("output_format jpeg", GEN, {"prompt": "x", "output_format": "jpeg"}, 400, "unsupported_parameter"),
    ("cfg a string", GEN, {"prompt": "x", "cfg": "high"}, 400, "invalid_value"),
    ("seed negative", GEN, {"prompt": "x", "seed": -1}, 400, "invalid_value"),
    ("tau 0", GEN, {"prompt": "x", "tau": 0}, 400, "invalid_value"),
    ("top_p 2", GEN, {"prompt": "x", "top_p": 2}, 400, "invalid_value"),
    ("unknown pn", GEN, {"prompt": "x", "pn": "7M"}, 400, "invalid_pn"),
    ("image prompt past the context", GEN, {"prompt": "word " * 600}, 400, "context_length_exceeded"),
    ("edit as JSON", EDIT, {"prompt": "x"}, 400, "invalid_content_type"),
]


@pytest.mark.parametrize("name,path,body,status,code", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_bad_input_answered_4xx(server, name, path, body, status, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, headers, resp = server.request("POST", path, raw, {"Content-Type": "application/json"})
    assert got == status, resp
    err = json.loads(resp)["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"], err


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = "----vargpt-test-boundary"
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, data) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                  f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


GOOD_IMAGE = ("in.png", IMG.read_bytes())
BAD_EDITS = [  # (name, fields, files, status, code)
    ("no image", {"prompt": "x"}, {}, 400, "missing_image"),
    ("no prompt", {}, {"image": GOOD_IMAGE}, 400, "invalid_value"),
    ("empty prompt", {"prompt": "<image>"}, {"image": GOOD_IMAGE}, 400, "invalid_value"),
    ("image not an image", {"prompt": "x"}, {"image": ("in.png", b"not an image")}, 400, "invalid_image"),
    ("n not a number", {"prompt": "x", "n": "abc"}, {"image": GOOD_IMAGE}, 400, "invalid_value"),
    ("n 0", {"prompt": "x", "n": "0"}, {"image": GOOD_IMAGE}, 400, "invalid_value"),
    ("mask", {"prompt": "x"}, {"image": GOOD_IMAGE, "mask": GOOD_IMAGE}, 400, "unsupported_parameter"),
    ("two images", {"prompt": "x"}, {"image": GOOD_IMAGE, "image[]": GOOD_IMAGE}, 400, "invalid_value"),
]


@pytest.mark.parametrize("name,fields,files,status,code", BAD_EDITS, ids=[c[0] for c in BAD_EDITS])
def test_bad_edit_input_answered_4xx(server, name, fields, files, status, code):
    body, ctype = multipart(fields, files)
    got, _, resp = server.request("POST", EDIT, body, {"Content-Type": ctype})
    assert got == status, resp
    assert json.loads(resp)["error"]["code"] == code


def test_protocol_errors(server):
    # a body over the cap is refused from its Content-Length, before it is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode() + b"{")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and json.loads(body)["error"]["code"] == "body_too_large"
    status, _, body = server.request("GET", "/v1/nothing-here")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    status, _, body = server.request("GET", CHAT)
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"
    status, _, body = server.request("POST", CHAT, b"--x--\r\n", {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 400
    assert server.health()["status"] == "ok"  # still alive after all of the above


# ----------------------------------------------------------------------------- concurrency, queue, disconnects
def test_eight_concurrent_clients_match_single_runs(server):
    """8 clients at once (chat plain / sampled / streaming / with an image, and image generation):
    each answer equals the same request run alone afterwards."""
    c = server.client()

    def chat(i, stream=False, image=False):
        content = [{"type": "text", "text": f"Client {i} says hello."}] + ([_img(data_uri(IMG))] if image else [])
        kw = dict(model=MODEL_ID, messages=[{"role": "user", "content": content}], max_tokens=10,
                  temperature=0.8, seed=100 + i)
        if stream:
            return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                           if ch.choices)
        return c.chat.completions.create(**kw).choices[0].message.content

    def draw(i):
        return c.images.generate(prompt=f"picture {i}", extra_body={"seed": 200 + i}).data[0].b64_json

    calls = [lambda: chat(0), lambda: chat(1, stream=True), lambda: chat(2, image=True), lambda: draw(3),
             lambda: chat(4), lambda: chat(5, stream=True), lambda: draw(6), lambda: chat(7, image=True)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(calls)) as pool:
        together = [f.result(timeout=180) for f in [pool.submit(call) for call in calls]]
    elapsed = time.perf_counter() - t0
    alone = [call() for call in calls]
    assert together == alone
    assert len(set(together)) == len(calls)  # all different: nothing mixed up
    assert elapsed < 120 and server.health()["busy"] is False
    assert c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "still there?"}],
                                     max_tokens=2).choices[0].message.content


def test_max_queue_refuses_with_503(server):
    """With --max-queue 0 a request that would wait is refused while another runs."""
    results = {}

    def slow():
        results["slow"] = server.post_json(GEN, {"prompt": "slow", "n": 3, "seed": 1})[0]

    server.worker.max_queue = 0
    try:
        t = threading.Thread(target=slow)
        t.start()
        t0 = time.time()
        while not server.health()["busy"]:
            assert time.time() - t0 < 10
            time.sleep(0.02)
        status, _, body = server.post_json(CHAT, _chat())
        assert status == 503 and json.loads(body)["error"]["code"] == "queue_full"
        t.join(60)
    finally:
        server.worker.max_queue = None
    assert results["slow"] == 200
    assert server.post_json(CHAT, _chat())[0] == 200


def _open_and_drop(server, path: str, obj, read_bytes: int) -> None:
    """Send a request, read a little of the answer (or none), then close the connection."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = json.dumps(obj).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while len(got) < read_bytes:
        chunk = sock.recv(4096)
        assert chunk
        got += chunk
    sock.close()
    return got


def test_disconnect_frees_the_model(server, caplog):
    caplog.set_level(logging.INFO, logger="vargpt_mlx.server")
    # a stream of up to 30000 tokens (~30 s or more): the client reads a few and hangs up
    got = _open_and_drop(server, CHAT, {"messages": [{"role": "user", "content": "Go on forever."}],
                                        "max_tokens": 30000, "stream": True}, 2000)
    assert b"data: " in got
    assert server.wait_idle(timeout=10) < 5
    # a non-streaming image request: the client hangs up while it is drawn. The tiny model draws
    # 4 images in ~0.25 s, under the server's 0.25 s disconnect poll, so each scale is made to take
    # 0.5 s: undisturbed, the request takes >= 7 scales x 0.5 s = 3.5 s; the poll must stop it sooner.
    real_check = server_worker.Job.check

    def slow_check(job):
        time.sleep(0.5)
        real_check(job)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server_worker.Job, "check", slow_check)
        _open_and_drop(server, GEN, {"prompt": "never mind", "n": 4, "seed": 1}, 0)
        t0 = time.time()
        while not server.health()["busy"] and time.time() - t0 < 5:
            time.sleep(0.02)
        assert server.wait_idle(timeout=10) < 2.5
    time.sleep(0.3)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "vargpt_mlx.server"]
    assert sum("client disconnected" in ln for ln in lines) >= 2, lines
    assert server.post_json(CHAT, _chat())[0] == 200


# ----------------------------------------------------------------------------- the page in a browser
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary, driver = _chromium(), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # an OpenBLAS preload crashes Chromium
    drv = webdriver.Chrome(service=Service(driver, env=env), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def test_page_in_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server.base + "/")
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == MODEL_ID)
    # chat: attach an image, send, see the streamed reply
    browser.find_element(By.ID, "chat-attach").send_keys(str(IMG))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
    browser.find_element(By.ID, "chat-input").send_keys("What is in this picture?")
    browser.find_element(By.ID, "chat-send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
               and "streaming" not in d.find_element(By.CSS_SELECTOR, ".msg.assistant").get_attribute("class"))
    reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .body").text
    assert reply.strip(), "no reply text"
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img.attached")
    assert "prompt +" in browser.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text
    browser.save_screenshot(str(tmp_path / "chat.png"))
    # generate: prompt, seed, aspect; the image appears
    browser.find_element(By.ID, "tab-generate").click()
    browser.find_element(By.ID, "gen-prompt").send_keys("a lighthouse at dusk")
    browser.find_element(By.ID, "gen-seed").send_keys("9")
    browser.find_element(By.ID, "gen-submit").click()
    wait.until(lambda d: d.execute_script(
        "const i = document.querySelector('#gen-results img'); return i && i.complete && i.naturalWidth"))
    size = browser.execute_script("const i = document.querySelector('#gen-results img');"
                                  "return [i.naturalWidth, i.naturalHeight]")
    assert size == [256, 256]
    assert "seed 9" in browser.find_element(By.CSS_SELECTOR, "#gen-results figcaption").text
    browser.save_screenshot(str(tmp_path / "generate.png"))
    # edit: upload, instruction; the edited image appears
    browser.find_element(By.ID, "tab-edit").click()
    browser.find_element(By.ID, "edit-file").send_keys(str(IMG))
    browser.find_element(By.ID, "edit-prompt").send_keys("make it blue")
    browser.find_element(By.ID, "edit-seed").send_keys("2")
    browser.find_element(By.ID, "edit-submit").click()
    wait.until(lambda d: d.execute_script(
        "const i = document.querySelector('#edit-results img'); return i && i.complete && i.naturalWidth"))
    assert "seed 2" in browser.find_element(By.CSS_SELECTOR, "#edit-results figcaption").text
    assert not browser.find_element(By.ID, "edit-error").is_displayed()
    assert (tmp_path / "chat.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------- the command
def test_cli_serve_bad_options(model_dir):
    from typer.testing import CliRunner

    from vargpt_mlx.cli.main import app

    def run(*args):
        return CliRunner().invoke(app, ["serve", *map(str, args)], env={"VARGPT_MODEL": ""})

    r = run()
    assert r.exit_code == 2 and "no model given" in r.output
    r = run("--model", "/nonexistent/model")
    assert r.exit_code == 2 and "does not exist" in r.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run("--model", model_dir, "--port", busy.getsockname()[1])
    assert r.exit_code == 2 and "cannot listen" in r.output
    r = run("--model", model_dir, "--max-queue", -1)
    assert r.exit_code == 2 and "--max-queue" in r.output


def test_cli_serve_end_to_end(model_dir, tmp_path):
    """``vargpt-mlx serve`` in its own process: loads, answers the client with the key, logs, stops on Ctrl-C."""
    import signal
    import subprocess
    import sys

    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vargpt_mlx.cli.main", "serve", "--model", str(model_dir), "--port", str(port),
                             "--api-key", "k3y", "--max-tokens", "4"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).parent.parent)
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.time() - t0 < 90, "the server did not come up"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["vargpt-tiny"]
        r = c.chat.completions.create(model="vargpt-tiny", messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens == 4  # --max-tokens is the default reply length
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = (tmp_path / "serve.log").read_text()
    assert f"serving vargpt-tiny on http://127.0.0.1:{port}/" in out
    assert "POST /v1/chat/completions 200 tokens " in out and "GET /v1/models 401" in out
    assert "Traceback" not in out


# ----------------------------------------------------------------------------- the shipped nano model
def test_nano_serves_every_endpoint(tmp_path):
    """``serve --model nano`` with the real VAE: chat (plain, streaming, image), generation, edit."""
    from vargpt_mlx.hub import NANO, NANO_DIR

    if not (NANO_DIR / "config.json").is_file():
        pytest.skip(f"the nano model is not shipped in this checkout ({NANO_DIR})")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BSQVAE, "decode", REAL_VAE_DECODE)  # the module's cheap stand-in may be active
        with running_server(NANO, ServerSettings(model_id=NANO)) as srv:
            c = srv.client()
            assert [m.id for m in c.models.list().data] == [NANO]
            r = c.chat.completions.create(model=NANO, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
            assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
            streamed = list(c.chat.completions.create(model=NANO, max_tokens=8, stream=True, messages=[
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}, _img(data_uri(IMG))]}]))
            assert [ch.choices[0].finish_reason for ch in streamed if ch.choices][-1] in ("stop", "length")
            a = c.images.generate(prompt="a red circle", extra_body={"seed": 5})
            b = c.images.generate(prompt="a red circle", extra_body={"seed": 5})
            im = decode_png(a.data[0].b64_json)
            assert np.array_equal(np.asarray(im), np.asarray(decode_png(b.data[0].b64_json)))
            assert im.info["seed"] == "5" and a.size == f"{im.width}x{im.height}"
            with open(IMG, "rb") as f:
                e = c.images.edit(image=f, prompt="make it blue", extra_body={"seed": 1})
            assert decode_png(e.data[0].b64_json).info["mode"] == "edit"
