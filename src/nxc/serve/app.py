"""The nxc-serve ASGI app (Starlette): one Pipeline shared by every request, model work on worker threads.

    app = create_app("build/fp32")              # uvicorn.run(app) -- or `nxc-serve build/fp32`

The routes and the JSON they speak are in nxc.serve's docstring. A request never kills the server: what the
client got wrong is a 4xx JSON error with the runtime's one-line message, anything else a 500 JSON error (logged).
"""
from __future__ import annotations

import json
import logging
import os
import time
from itertools import chain
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse

from nxc.manifest import BuildError
from nxc.runtime.images import ImageError
from nxc.runtime.pipeline import Box, Done, Pipeline, Token
from nxc.prompt import SLOT, PromptError, render_reply
from nxc.runtime.timing import Timeline
from nxc.serve import protocol as proto
from nxc.serve.metrics import Metrics

log = logging.getLogger("nxc.serve")
STATIC = Path(__file__).parent / "static"


class ReplyText:
    """The decoded reply (`<at> <boxes>` literal) -> the text a client sees ([k]), in deltas whose concatenation
    is the final text: a tail that may still become a slot is held back until the next token settles it."""

    def __init__(self):
        self.raw, self.sent = "", ""

    def add(self, raw_delta: str) -> str:
        self.raw += raw_delta
        text = render_reply(self.raw)
        hold = next((n for n in range(len(SLOT) - 1, 0, -1) if text.endswith(SLOT[:n])), 0)
        return self._send(text[:len(text) - hold])

    def finish(self, final: str) -> str:
        return self._send(final)

    def _send(self, text: str) -> str:
        delta = text[len(self.sent):]        # by length: the decoder only ever appends to earlier text
        self.sent = max(self.sent, text, key=len)
        return delta


def _error(e: Exception) -> proto.ApiError:
    if isinstance(e, proto.ApiError):
        return e
    if isinstance(e, (PromptError, ImageError, ValueError)):
        return proto.ApiError(400, str(e).splitlines()[0] if str(e) else type(e).__name__)
    log.exception("nxc-serve: request failed")
    return proto.ApiError(500, f"internal error ({type(e).__name__}: {str(e)[:200]}); the server keeps serving",
                          "internal_error")


class Server:
    """Request handling over one Pipeline; create_app wires its methods to routes."""

    def __init__(self, pipe: Pipeline, model: str, limits: proto.Limits):
        self.pipe, self.model, self.limits = pipe, model, limits
        self.metrics = Metrics()
        self.slot = pipe.manifest.token_id(pipe.manifest.heads[0].emit) if pipe.manifest.heads else None

    # -- plumbing --------------------------------------------------------------------------------------------
    async def read_json(self, request: Request):
        limit = self.limits.max_request_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise proto.ApiError(413, f"the request is {int(length)} bytes, over this server's limit of {limit}; "
                                      "send a smaller image", "request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise proto.ApiError(413, f"the request is over this server's limit of {limit} bytes; send a "
                                          "smaller image", "request_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise proto.ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None

    def check_model(self, body) -> None:
        name = body.get("model") if isinstance(body, dict) else None
        if name not in (None, "", self.model):
            raise proto.ApiError(404, f"the model {name!r} does not exist here; this server serves {self.model!r} "
                                      "(GET /v1/models)", "model_not_found")

    def start(self, req: proto.ChatRequest):
        """Rebuild the conversation from the request and start the turn: (event iterator, its timeline)."""
        conv = self.pipe.conversation(req.image)
        for t in req.history:
            conv.add_turn(t.user, t.reply_raw, boxes=t.boxes, reply_boxes=t.reply_boxes)
        timeline = Timeline()
        events = conv.stream(req.question, boxes=req.boxes, timeline=timeline, **req.sampling)
        first = next(events)                      # prefill happens here: prompt errors surface as 400s
        return chain([first], events), timeline

    def answer(self, req: proto.ChatRequest):
        events, timeline = self.start(req)
        result = None
        for ev in events:
            if isinstance(ev, Done):
                result = ev.result
        self.metrics.turn(len(result.prompt_ids), len(result.token_ids), len(result.detections), timeline)
        return result

    async def handle(self, request: Request, work) -> Response:
        t0 = time.perf_counter()
        self.metrics.begin()
        status = 500
        try:
            response = await work(request)
            status = response.status_code
            if isinstance(response, EventSourceResponse):   # the stream's own generator records its end
                return response
        except Exception as e:  # noqa: BLE001 -- every failure becomes a JSON error; the server goes on
            err = _error(e)
            status = err.status
            response = JSONResponse(err.body(), status_code=err.status)
        self.metrics.end(request.url.path, status, time.perf_counter() - t0)
        return response

    # -- routes ----------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self.handle(request, self._chat)

    async def _chat(self, request: Request) -> Response:
        body = await self.read_json(request)
        self.check_model(body)
        req = await run_in_threadpool(proto.parse_chat, body, self.limits)
        if req.stream:
            return await self._stream(request, req)
        result = await run_in_threadpool(self.answer, req)
        return JSONResponse(proto.completion(proto.new_id(), self.model, result))

    async def _stream(self, request: Request, req: proto.ChatRequest) -> EventSourceResponse:
        events, timeline = await run_in_threadpool(self.start, req)
        cid, created, t0 = proto.new_id(), int(time.time()), time.perf_counter()

        def chunk(delta, ids=(), finish=None) -> str:
            return json.dumps(proto.chunk(cid, self.model, created, delta, token_ids=ids, finish_reason=finish))

        async def sse():
            status = 200
            text, pending = ReplyText(), None
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for ev in iterate_in_threadpool(events):
                    if isinstance(ev, Token):
                        delta = text.add(ev.text)
                        if ev.id == self.slot:             # its box follows at once: one chunk for both
                            pending = (delta, [ev.id])
                        else:
                            yield chunk({"content": delta}, [ev.id])
                    elif isinstance(ev, Box):
                        delta, ids = pending or ("", [])
                        pending = None
                        yield chunk({"content": delta,
                                     "grounding": [proto.detection_json(ev.index, ev.detection, with_mask=False)]},
                                    ids)
                    elif isinstance(ev, Done):
                        r = ev.result
                        self.metrics.turn(len(r.prompt_ids), len(r.token_ids), len(r.detections), timeline)
                        yield chunk({"content": text.finish(r.text),
                                     "grounding": [proto.detection_json(k, d) for k, d in enumerate(r.detections)]},
                                    finish=r.finish_reason)
                        if req.include_usage:
                            yield json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                              "model": self.model, "choices": [],
                                              "usage": proto.usage(len(r.prompt_ids), len(r.token_ids))})
                yield "[DONE]"
            except Exception as e:  # noqa: BLE001 -- headers are sent: the error goes in the stream
                err = _error(e)
                status = err.status
                yield json.dumps(err.body())
            finally:
                self.metrics.end(request.url.path, status, time.perf_counter() - t0)

        return EventSourceResponse(sse(), sep="\n", ping=15)

    async def ground(self, request: Request) -> Response:
        async def work(request):
            body = await self.read_json(request)
            self.check_model(body)
            req = await run_in_threadpool(proto.parse_ground, body, self.limits)
            r = await run_in_threadpool(self.answer, req)
            return JSONResponse({"text": r.text, "raw_text": r.raw_text, "token_ids": r.token_ids,
                                 "finish_reason": r.finish_reason,
                                 "grounding": [proto.detection_json(k, d) for k, d in enumerate(r.detections)],
                                 "usage": proto.usage(len(r.prompt_ids), len(r.token_ids))})
        return await self.handle(request, work)

    async def models(self, request: Request) -> Response:
        m = self.pipe.manifest
        return JSONResponse({"object": "list", "data": [{
            "id": self.model, "object": "model", "created": 0, "owned_by": "nxc",
            "precision": m.precision, "max_context": m.max_context}]})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model})

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")


def model_name(build: str | Path) -> str:
    return "nxc-" + Path(build).resolve().name


def create_app(build: str | Path, *, model: str | None = None, limits: proto.Limits | None = None,
               backend: str = "onnxruntime", providers: list[str] | None = None, threads: int | None = None,
               pipeline: Pipeline | None = None) -> Starlette:
    """Load the build (errors surface here, before serving) and return the app. `pipeline` shares a loaded one."""
    pipe = pipeline or Pipeline.load(build, backend=backend, providers=providers, threads=threads)
    srv = Server(pipe, model or model_name(build), limits or proto.Limits())
    routes = [Route("/v1/chat/completions", srv.chat_completions, methods=["POST"]),
              Route("/v1/ground", srv.ground, methods=["POST"]),
              Route("/v1/models", srv.models, methods=["GET"]),
              Route("/healthz", srv.healthz, methods=["GET"]),
              Route("/metrics", srv.prometheus, methods=["GET"]),
              Route("/", srv.page, methods=["GET"]),
              Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.server = srv
    return app


async def _not_found(request: Request, exc) -> Response:
    return JSONResponse(proto.ApiError(404, f"no route {request.url.path}; see GET /v1/models, POST "
                                            "/v1/chat/completions, POST /v1/ground", "not_found").body(), 404)


async def _not_allowed(request: Request, exc) -> Response:
    return JSONResponse(proto.ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                       "method_not_allowed").body(), 405)


def app_from_env() -> Starlette:
    """uvicorn's factory for --workers N (each worker process loads the build named in NXC_SERVE_* variables)."""
    limits = proto.Limits(**json.loads(os.environ.get("NXC_SERVE_LIMITS", "{}")))
    opts = json.loads(os.environ.get("NXC_SERVE_OPTIONS", "{}"))
    try:
        return create_app(os.environ["NXC_SERVE_BUILD"], limits=limits, **opts)
    except BuildError as e:
        raise SystemExit(f"nxc-serve: {e}") from None
