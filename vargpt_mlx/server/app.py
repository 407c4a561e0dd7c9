"""The FastAPI application: OpenAI-compatible routes over one model owned by a ``ModelWorker``.

The routes are the README's (``serve``); the page's files are under ``static/``. Every error is
OpenAI's ``{"error": {"message", "type", "param", "code"}}``. One log line per request (route,
status, tokens or scales, seconds) on the ``vargpt_mlx.server`` logger.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import hmac
import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, api, schedules
from ..pipelines.image_generation import context_error
from .errors import APIError, Cancelled, bad_request, error_body
from .inputs import choose_size, convert_messages, decode_image_url, open_image_bytes
from .jobs import ChatJob, ImageJob, run_chat, run_images
from .schemas import (EDIT_FLOAT_FIELDS, EDIT_INT_FIELDS, EDIT_STR_FIELDS, ChatRequest, ImageGenerationRequest)
from .worker import ModelWorker

log = logging.getLogger("vargpt_mlx.server")
STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/health",)  # no API key needed
PAGE_PATHS = ("/", "/favicon.ico")  # the page's own files (no model access): a browser must load them


@dataclass
class ServerSettings:
    model_id: str = "vargpt"
    api_key: str | None = None
    allow_local_files: bool = False
    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 40_000_000
    max_tokens: int = 512  # default for chat requests without max_tokens
    temperature: float = 0.0  # default for chat requests without temperature (upstream: greedy)
    out_dir: Path | None = None  # keep drawn images here (default: a temporary directory, files deleted)
    batch_size: int | None = None  # images drawn together per request (default: all n)


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes (--max-body-mb)", "body_too_large")


# ----------------------------------------------------------------------------------- ASGI gate
class Gate:
    """Outermost layer: API key, body size cap, and the one log line per request."""

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        info = {"status": None, "logged": False}

        def log_line():
            if info["logged"]:
                return
            info["logged"] = True
            extra = state.get("log", "")
            if state.get("cancelled"):
                extra = (extra + " " if extra else "") + "client disconnected"
            log.info("%s %s %s%s %.2fs", scope["method"], scope["path"], info["status"] or "-",
                     f" {extra}" if extra else "", time.perf_counter() - t0)

        async def send_logged(message):
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log_line()

        try:
            path = scope["path"]
            headers = dict(scope["headers"])
            key = self.settings.api_key
            if key and path not in PUBLIC_PATHS and path not in PAGE_PATHS and not path.startswith("/static/"):
                auth = headers.get(b"authorization", b"").decode("latin-1")
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                    err = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                   "invalid_api_key")
                    return await JSONResponse(err.body(), status_code=401,
                                              headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_logged)
            limit = self.settings.max_body_bytes
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    too_big = int(length) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    err = BodyTooLarge(limit)
                    return await JSONResponse(err.body(), status_code=413,
                                              headers={"Connection": "close"})(scope, receive, send_logged)
            seen = 0

            async def receive_capped():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise BodyTooLarge(limit)
                return message

            await self.app(scope, receive_capped, send_logged)
        finally:
            log_line()


# ----------------------------------------------------------------------------------- helpers
def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body",))
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})", None
    if not loc and first.get("type") == "model_type":
        return "the request body must be a JSON object", None
    msg = first["msg"]
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


async def _parse_json(request: Request, model):
    body = await request.body()
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object", "invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        msg, param = _validation_message(e)
        raise bad_request(msg, "invalid_json" if param is None else "invalid_value", param) from None


def _error_from(e: BaseException) -> APIError:
    """A worker's exception as an API error: input problems (ValueError and its kin) are 400s."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        return bad_request(str(e).splitlines()[0] if str(e) else type(e).__name__, "invalid_request")
    return APIError(500, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    "internal_error")


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


# ----------------------------------------------------------------------------------- the app
def create_app(worker: ModelWorker, settings: ServerSettings) -> FastAPI:
    """The application for a worker whose model is loaded (``worker.wait_ready()`` first)."""
    pipe = worker.wait_ready()
    cfg = pipe.config
    tokens = cfg.tokens
    image_marker = "".join(pipe.tokenizer.convert_ids_to_tokens(
        [tokens.image_gen_start_token_id, tokens.image_gen_end_token_id]))
    context = cfg.llm.max_position_embeddings
    model_pn = cfg.pn
    if settings.out_dir is not None:
        out_dir, keep_images = Path(settings.out_dir), True
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        out_dir, keep_images = Path(tempfile.mkdtemp(prefix="vargpt-serve-")), False
        atexit.register(shutil.rmtree, out_dir, True)  # also when the app never ran (lifespan below)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if not keep_images:
            shutil.rmtree(out_dir, ignore_errors=True)

    app = FastAPI(title="vargpt-mlx", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.worker = worker
    app.state.settings = settings

    # ---- errors: always OpenAI's shape
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, msg, code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"msg": "invalid request"}
        return JSONResponse(error_body(first["msg"], code="invalid_value"), status_code=400)

    @app.exception_handler(ValueError)  # the library's input errors (ChatError, ImageError, ...)
    async def _value_error(request: Request, e: ValueError):
        err = _error_from(e)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(_error_from(e).body(), status_code=500)

    async def _submit_and_wait_start(request: Request, fn):
        """Queue ``fn``; wait (watching for a disconnect) for its first event."""
        job = worker.submit(fn)
        try:
            kind, value = await job.next(request)
        except Cancelled:
            request.state.cancelled = True
            raise APIError(499, "client closed the request", "client_closed") from None
        except BaseException:
            job.cancel()
            raise
        if kind == "error":
            if isinstance(value, Cancelled):
                request.state.cancelled = True
            raise _error_from(value)
        return job, kind, value

    # ---- routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "busy": worker.busy, "waiting": worker.waiting,
                "served": worker.served}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico")
    async def favicon():
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": created,
                                            "owned_by": "vargpt-mlx"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != settings.model_id:
            raise APIError(404, f"model {model_id!r} is not served here (this server serves {settings.model_id!r})",
                           "model_not_found")
        return {"id": settings.model_id, "object": "model", "created": created, "owned_by": "vargpt-mlx"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = await _parse_json(request, ChatRequest)
        for name in ("tools", "functions", "tool_choice", "audio"):
            if getattr(req, name):
                raise bad_request(f"{name} is not supported by this model", "unsupported_parameter", name)
        if req.logprobs or req.top_logprobs:
            raise bad_request("logprobs are not supported", "unsupported_parameter", "logprobs")
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", "unsupported_parameter", "logit_bias")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(req, name):
                raise bad_request(f"{name} is not supported (use repetition_penalty)", "unsupported_parameter", name)
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("only text responses are supported (response_format type 'text')",
                              "unsupported_parameter", "response_format")
        if req.modalities and any(m not in ("text", "image") for m in req.modalities):
            raise bad_request("modalities may hold 'text' and 'image'", "unsupported_parameter", "modalities")
        if req.n not in (None, 1):
            raise bad_request("n must be 1 (one reply per request)", "invalid_value", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise bad_request("stop takes at most 4 non-empty strings", "invalid_value", "stop")
        max_tokens = req.max_completion_tokens or req.max_tokens or settings.max_tokens
        if max_tokens > context:
            raise bad_request(f"max_tokens is {max_tokens}; the model's context is {context} tokens",
                              "invalid_value", "max_tokens")
        msgs = convert_messages(req.messages, image_marker)

        def decode(urls, first):
            return [decode_image_url(u, f"image {first + i + 1}", allow_local_files=settings.allow_local_files,
                                     max_pixels=settings.max_image_pixels) for i, u in enumerate(urls)]

        history_images = await run_in_threadpool(decode, msgs.history_images, 0)
        images = await run_in_threadpool(decode, msgs.images, len(msgs.history_images))
        job_req = ChatJob(history=msgs.history, history_images=history_images, text=msgs.text, images=images,
                          max_tokens=max_tokens,
                          temperature=settings.temperature if req.temperature is None else req.temperature,
                          top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=stop,
                          repetition_penalty=req.repetition_penalty)
        job, _, _ = await _submit_and_wait_start(
            request, lambda job, pipe: run_chat(job, pipe, job_req, out_dir, keep_images))
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        now = int(time.time())

        def usage(done):
            p, c = done["prompt_tokens"], done["completion_tokens"]
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        def log_done(done):
            request.state.log = f"tokens {done['prompt_tokens']}+{done['completion_tokens']}" + (
                f" image scales {done['scales']}" if done["images"] else "")

        if not req.stream:
            text, images_out, image_error = [], [], None
            try:
                while True:
                    kind, value = await job.next(request)
                    if kind == "text":
                        text.append(value)
                    elif kind == "image":
                        images_out.append(value)
                    elif kind == "image_error":
                        image_error = value
                    elif kind == "error":
                        raise _error_from(value)
                    elif kind == "done":
                        done = value
                        break
            except Cancelled:
                request.state.cancelled = True
                raise APIError(499, "client closed the request", "client_closed") from None
            message = {"role": "assistant", "content": "".join(text)}
            if images_out:
                message["images"] = images_out
            if image_error:
                message["image_error"] = image_error
            log_done(done)
            return {"id": cid, "object": "chat.completion", "created": now, "model": settings.model_id,
                    "system_fingerprint": f"vargpt-mlx-{__version__}",
                    "choices": [{"index": 0, "message": message, "logprobs": None,
                                 "finish_reason": done["finish_reason"]}],
                    "usage": usage(done)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta, finish=None):
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": now, "model": settings.model_id,
                         "system_fingerprint": f"vargpt-mlx-{__version__}",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await job.next()
                    if kind == "text":
                        yield chunk({"content": value})
                    elif kind == "image":
                        yield chunk({"images": [value]})
                    elif kind == "image_error":
                        yield chunk({"image_error": value})
                    elif kind == "progress":  # an SSE comment: clients ignore it; a gone client is noticed
                        yield f": drawing image, scale {value[0]}/{value[1]}\n\n".encode()
                    elif kind == "error":
                        err = _error_from(value)
                        request.state.log = f"error {err.status}"
                        yield _sse(err.body())
                        break
                    elif kind == "done":
                        log_done(value)
                        yield chunk({}, value["finish_reason"])
                        if include_usage:
                            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": now,
                                        "model": settings.model_id, "choices": [], "usage": usage(value)})
                        break
                yield b"data: [DONE]\n\n"
            except (asyncio.CancelledError, GeneratorExit):
                request.state.cancelled = True
                raise
            finally:
                job.cancel()  # a no-op once the job is done; otherwise the model stops at the next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _images(request: Request, prompt: str, n: int, size_choice, params: dict, image=None,
                      response_format: str | None = None, output_format: str | None = None,
                      stream=None) -> dict:
        if response_format not in (None, "b64_json"):
            raise bad_request("response_format 'url' is not supported: this server returns images inline "
                              "(response_format 'b64_json')", "unsupported_parameter", "response_format")
        if output_format not in (None, "png"):
            raise bad_request("output_format must be 'png' (the PNG keeps the prompt, seed and settings)",
                              "unsupported_parameter", "output_format")
        if stream:
            raise bad_request("streaming image responses are not supported", "unsupported_parameter", "stream")
        text = prompt.replace(api.IMAGE_MARKER, "") if image is not None else prompt
        if not text.strip():
            raise bad_request("prompt is empty", "invalid_value", "prompt")
        settings_kw = {k: v for k, v in params.items() if v is not None}
        settings_kw.update(pn=size_choice.pn, aspect=size_choice.aspect)
        try:  # validate before queueing
            s = api.make_settings(**settings_kw)
        except ValueError as e:
            raise bad_request(str(e), "invalid_value") from None
        settings_kw["seed"] = s.seed
        if image is None:
            n_prompt = len(api.t2i_prompt_ids(pipe.tokenizer, prompt))
            if (msg := context_error(pipe.model, n_prompt, "prompt")) is not None:
                raise bad_request(msg, "context_length_exceeded", "prompt")
        job_req = ImageJob(prompt=prompt, n=n, settings=settings_kw, image=image, batch_size=settings.batch_size)
        job, kind, value = await _submit_and_wait_start(request, lambda job, p: run_images(job, p, job_req))
        images = value["images"]
        pngs = await run_in_threadpool(lambda: [api.png_bytes(im) for im in images])
        first = images[0]
        request.state.log = f"images {n} scales {value['scales']}"
        vargpt = {"size": f"{first.width}x{first.height}", "pn": s.pn or model_pn,
                  "aspect": api.aspect_label(float(s.aspect)), "seed": s.seed,
                  "scales": len(schedules.get_schedule(s.pn or model_pn, s.aspect)),
                  "seconds": round(value["seconds"], 3)}
        if size_choice.note:
            vargpt["note"] = size_choice.note
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": None,
                          "seed": int(im.info["seed"])} for png, im in zip(pngs, images)],
                "output_format": "png", "size": f"{first.width}x{first.height}", "vargpt": vargpt}

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        req: ImageGenerationRequest = await _parse_json(request, ImageGenerationRequest)
        size_choice = choose_size(req.size, req.aspect, req.pn, model_pn)
        params = dict(seed=req.seed, cfg=req.cfg, tau=req.tau, top_k=req.top_k, top_p=req.top_p)
        return await _images(request, req.prompt, req.n, size_choice, params, response_format=req.response_format,
                             output_format=req.output_format, stream=req.stream)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise bad_request("send multipart/form-data with an 'image' file and a 'prompt' field",
                              "invalid_content_type")
        try:
            form = await request.form(max_files=4, max_fields=64)
        except APIError:
            raise
        except Exception as e:  # malformed multipart
            raise bad_request(f"malformed multipart body: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                              "invalid_multipart") from None
        try:
            files = [v for k in ("image", "image[]") for v in form.getlist(k)]
            if form.get("mask") is not None:
                raise bad_request("masks are not supported: the instruction says what to change", "unsupported_parameter",
                                  "mask")
            if not files:
                raise bad_request("an 'image' file is required", "missing_image", "image")
            if len(files) > 1:
                raise bad_request("exactly one input image is supported", "invalid_value", "image")
            upload = files[0]
            if isinstance(upload, str):
                raise bad_request("'image' must be a file upload", "invalid_value", "image")
            fields: dict = {}
            for name in EDIT_STR_FIELDS:
                v = form.get(name)
                if v is not None and not isinstance(v, str):
                    raise bad_request(f"{name} must be a text field", "invalid_value", name)
                fields[name] = v
            for name, bounds in EDIT_INT_FIELDS.items():
                fields[name] = _form_number(form.get(name), name, int, bounds)
            for name, bounds in EDIT_FLOAT_FIELDS.items():
                fields[name] = _form_number(form.get(name), name, float, bounds)
            if fields["prompt"] is None:
                raise bad_request("prompt is required", "invalid_value", "prompt")
            data = await upload.read()
        finally:
            await form.close()
        image = await run_in_threadpool(open_image_bytes, data, "image", settings.max_image_pixels)
        size_choice = choose_size(fields["size"], fields["aspect"], fields["pn"], model_pn)
        params = dict(seed=fields["seed"], cfg=fields["cfg"], tau=fields["tau"], top_k=fields["top_k"],
                      top_p=fields["top_p"])
        stream = fields["stream"] not in (None, "", "false", "False", "0")
        return await _images(request, fields["prompt"], fields["n"] or 1, size_choice, params, image=image,
                             response_format=fields["response_format"], output_format=fields["output_format"],
                             stream=stream)

    return Gate(app, settings)


def _form_number(value, name: str, kind, bounds):
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a number", "invalid_value", name)
    try:
        x = kind(value)
    except ValueError:
        raise bad_request(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                          "invalid_value", name) from None
    if bounds is not None:
        lo, hi = bounds
        if (lo is not None and x < lo) or (hi is not None and x > hi) or (kind is float and x != x):
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise bad_request(f"{name} must be in {rng}, got {value}", "invalid_value", name)
    return x
