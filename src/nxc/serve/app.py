"""The nxc-serve ASGI app (Starlette): one Pipeline shared by every request, model work on worker threads.

    app = create_app("build/fp32")              # uvicorn.run(app) -- or `nxc-serve build/fp32`

The routes and the JSON they speak are in nxc.serve's docstring. A request never kills the server: what the
client got wrong is a 4xx JSON error with the runtime's one-line message, anything else a 500 JSON error (logged).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
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
from nxc.runtime.backends import BackendError
from nxc.runtime.batch import Batcher, Closed, QueueFull
from nxc.runtime.images import ImageError
from nxc.runtime.events import Image
from nxc.runtime.pipeline import Box, Done, Pipeline, Token
from nxc.prompt import SLOT, PromptError, render_reply
from nxc.runtime.modules import calls_json
from nxc.runtime.timing import Timeline
from nxc.serve import protocol as proto
from nxc.serve.metrics import Metrics

log = logging.getLogger("nxc.serve")


@dataclass
class _Turns:
    """A request's turns: event sources (a batch Handle or a generator), their timelines, how to cancel them."""
    sources: list
    timelines: list
    cancels: list
    objects: int | None = None     # a retrieval build's object list length (ReplyText renders its groundings)
STATIC = Path(__file__).parent / "static"


class ReplyText:
    """The decoded reply (`<at> <boxes>` literal; a retrieval build's `<ground>...</objects>`) -> the text a client
    sees ([k]), in deltas whose concatenation is the final text: a tail that may still become a slot (a grounding)
    is held back until the next tokens settle it. objects: a retrieval build's object count, else None; hide: a
    drawing build's signal tokens as they read ("[IMG0][IMG1][IMG2][IMG3]"), left out as ChatResult.text leaves them."""

    def __init__(self, objects: int | None = None, hide: str = ""):
        self.raw, self.sent, self.objects, self.hide = "", "", objects, hide

    def add(self, raw_delta: str) -> str:
        self.raw += raw_delta
        text = render_reply(self.raw)
        if self.objects is not None:
            from nxc.object_index import render, settled
            text = render(text, self.objects)
            return self._send(text[:settled(text)])
        if self.hide:                        # a drawing build's signal tokens: the picture stands for them
            text = text.replace(self.hide, "")
        hold = max(next((n for n in range(len(tail) - 1, 0, -1) if text.endswith(tail[:n])), 0)
                   for tail in (SLOT, self.hide) if tail)
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
    """Request handling over one Pipeline; create_app wires its methods to routes.

    Turns decode on a continuous-batching scheduler (nxc.runtime.batch) when the backend allows it (ONNX Runtime,
    KV cache in host memory): up to max_batch rows per llm step (a request of n completions takes n, and n over
    max_batch is a 400), then up to max_queue turns waiting for a row, beyond that 503 with Retry-After; a client
    that goes away frees its row at the next step. Beam search, and backends that cannot batch, run one turn per
    worker thread as before."""

    def __init__(self, pipe: Pipeline, model: str, limits: proto.Limits, *, max_batch: int = 8, max_queue: int = 32,
                 drain_seconds: float = 300.0):
        self.pipe, self.model, self.limits, self.drain_seconds = pipe, model, limits, drain_seconds
        self.metrics = Metrics()
        signal = pipe.dispatch.head_of_kind("signal")
        self.hide = signal.kind.group() if signal is not None else ""     # shown without them (as ChatResult.text)
        # the token a Box event follows: a box head's slot, or `</objects>` closing a retrieval build's grounding
        self.slot = (pipe.manifest.token_id("</objects>") if pipe.dispatch.head_of_kind("index") is not None
                     else pipe.manifest.token_id(pipe.manifest.heads[0].emit) if pipe.manifest.heads else None)
        self.draws = signal is not None                                    # a reply may make pictures
        self.batcher = None
        if max_batch > 0:
            try:
                self.batcher = Batcher(pipe, max_batch=max_batch, max_queue=max_queue)
            except BackendError as e:
                log.warning("nxc-serve: one turn per thread (%s)", e)

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

    def _conversation(self, req: proto.ChatRequest):
        """The request's conversation, rebuilt from the messages it sent."""
        if req.history and self.pipe.dispatch.head_of_kind("index") is not None:
            # an earlier reply's [k] cannot be turned back into the <objN> it was: refused, not guessed
            raise proto.ApiError(400, "this server runs a retrieval (ChatRex-style) build, which answers one turn per "
                                      "request: send the last user message only (earlier assistant messages cannot "
                                      "be replayed yet)")
        image = req.image
        if image is None:                   # no image part: only a build that draws from the text runs without one
            if not self.draws:
                raise proto.ApiError(400, "the first user message needs one image content part "
                                          '({"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}): '
                                          "this build answers about an image (only a build that draws, such as "
                                          "NExT-GPT, runs without one)")
            from nxc.runtime.images import blank_image
            image = blank_image()
        conv = self.pipe.conversation(image)
        for t in req.history:
            conv.add_turn(t.user, t.reply_raw, boxes=t.boxes, reply_boxes=t.reply_boxes)
        return conv

    def head_options(self, req: proto.ChatRequest) -> dict | None:
        """The turn's head options: the picture fields for a build that draws; refused by one that does not."""
        if req.draw and not self.draws:
            given = [f for f, o in proto.PICTURE_FIELDS.items() if o in req.draw]
            raise proto.ApiError(400, f"{', '.join(given)}: this build does not draw pictures (it has no signal "
                                      "tokens and generator); leave the image_* fields out")
        return {"signal": req.draw} if req.draw else None

    def start(self, req: proto.ChatRequest) -> "_Turns":
        """Start the request's turn (n of them for n > 1). Prompt errors raise here (400s); a full queue is a 503."""
        options = self.head_options(req)
        if self.batcher is not None and not req.beams:
            if req.n > self.batcher.max_batch:      # n rows at once: more could never start
                raise proto.ApiError(400, f"n {req.n} is more than this server decodes at once (--max-batch "
                                          f"{self.batcher.max_batch}); ask for at most {self.batcher.max_batch}")
            timelines = [Timeline() for _ in range(req.n)]
            conv = self._conversation(req)
            try:
                handles = self.batcher.submit_n(conv, req.question, req.n, boxes=req.boxes,
                                                timelines=timelines, head_options=options, **req.sampling)
            except QueueFull as e:
                raise proto.ApiError(503, f"the server is busy ({e})", "overloaded") from None
            except Closed as e:
                raise proto.ApiError(503, str(e), "shutting_down") from None
            return _Turns(handles, timelines, [h.cancel for h in handles], self._objects(conv))
        sources, timelines = [], []
        for i in range(req.n):                   # one turn per thread: completion i samples with seed + i
            timeline = Timeline()
            seed = {"seed": req.sampling["seed"] + i} if "seed" in req.sampling else {}
            conv = self._conversation(req)
            events = conv.stream(req.question, boxes=req.boxes, timeline=timeline, **{**req.sampling, **seed},
                                 head_options=options, **req.beams)
            first = next(events)                  # prefill happens here: prompt errors surface as 400s
            sources.append(chain([first], events))
            timelines.append(timeline)
        return _Turns(sources, timelines, [], self._objects(conv))

    def _objects(self, conv) -> int | None:
        return len(conv.slot_values()) if self.pipe.dispatch.head_of_kind("index") is not None else None

    def collect(self, turns: "_Turns") -> list:
        """Every turn's ChatResult (None for a cancelled one), metrics recorded."""
        results = []
        for source, timeline in zip(turns.sources, turns.timelines):
            result = None
            for ev in source:
                if isinstance(ev, Done):
                    result = ev.result
            if result is not None:
                self._record(result, timeline, source)
            results.append(result)
        return results

    def _record(self, r, timeline, source) -> None:
        self.metrics.turn(len(r.prompt_ids), len(r.token_ids), len(r.detections), timeline, len(r.images))
        wait = getattr(source, "queue_wait", None)
        if wait is not None:
            self.metrics.waited(wait)

    async def answer(self, request: Request, req: proto.ChatRequest) -> list:
        """The results of a non-streamed request; if the client disconnects meanwhile, its rows are cancelled."""
        turns = await run_in_threadpool(self.start, req)
        work = asyncio.ensure_future(run_in_threadpool(self.collect, turns))
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.25)
            if done:
                return work.result()
            if turns.cancels and await request.is_disconnected():
                for cancel in turns.cancels:
                    cancel()
                self.metrics.cancelled()

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
            headers = {"Retry-After": "1"} if err.status == 503 else None
            response = JSONResponse(err.body(), status_code=err.status, headers=headers)
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
        results = await self.answer(request, req)
        if any(r is None for r in results):
            raise proto.ApiError(499, "the client closed the request", "client_closed")
        # off the event loop: a picture's PNG takes milliseconds to encode
        return JSONResponse(await run_in_threadpool(proto.completion, proto.new_id(), self.model, results))

    async def _stream(self, request: Request, req: proto.ChatRequest) -> EventSourceResponse:
        turns = await run_in_threadpool(self.start, req)
        events, timeline = turns.sources[0], turns.timelines[0]
        cid, created, t0 = proto.new_id(), int(time.time()), time.perf_counter()

        def chunk(delta, ids=(), finish=None) -> str:
            return json.dumps(proto.chunk(cid, self.model, created, delta, token_ids=ids, finish_reason=finish))

        async def sse():
            status = 200
            text, pending, finished = ReplyText(turns.objects, self.hide), None, False
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for ev in iterate_in_threadpool(iter(events)):
                    if pending is not None and not isinstance(ev, Box):    # a grounding that named no box
                        yield chunk({"content": pending[0]}, pending[1])
                        pending = None
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
                    elif isinstance(ev, Image):                # a picture, once drawn (after the reply's text)
                        yield chunk({"images": [await run_in_threadpool(proto.picture_part, ev)]})
                    elif isinstance(ev, Done):
                        r = ev.result
                        self._record(r, timeline, events)
                        yield chunk({"content": text.finish(r.text),
                                     "grounding": [proto.detection_json(k, d) for k, d in enumerate(r.detections)],
                                     **({"calls": calls_json(r)} if r.calls else {})},
                                    finish=r.finish_reason)
                        if req.include_usage:
                            yield json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                              "model": self.model, "choices": [],
                                              "usage": proto.usage(len(r.prompt_ids), len(r.token_ids))})
                finished = True
                yield "[DONE]"
            except Exception as e:  # noqa: BLE001 -- headers are sent: the error goes in the stream
                err = _error(e)
                status = err.status
                yield json.dumps(err.body())
            finally:
                if not finished:                           # the client went away (or the stream failed)
                    for cancel in turns.cancels:
                        cancel()
                    if turns.cancels:
                        self.metrics.cancelled()
                self.metrics.end(request.url.path, status, time.perf_counter() - t0)

        # on SIGTERM a running stream has drain_seconds to finish before it is cut (the scheduler goes on meanwhile)
        return EventSourceResponse(sse(), sep="\n", ping=15, shutdown_grace_period=self.drain_seconds)

    async def ground(self, request: Request) -> Response:
        async def work(request):
            body = await self.read_json(request)
            self.check_model(body)
            req = await run_in_threadpool(proto.parse_ground, body, self.limits)
            results = await self.answer(request, req)
            if results[0] is None:
                raise proto.ApiError(499, "the client closed the request", "client_closed")
            r = results[0]
            return JSONResponse({"text": r.text, "raw_text": r.raw_text, "token_ids": r.token_ids,
                                 "finish_reason": r.finish_reason,
                                 "grounding": [proto.detection_json(k, d) for k, d in enumerate(r.detections)],
                                 **({"images": [proto.picture_part(im) for im in r.images]} if r.images else {}),
                                 **({"calls": calls_json(r)} if r.calls else {}),
                                 "usage": proto.usage(len(r.prompt_ids), len(r.token_ids))})
        return await self.handle(request, work)

    async def models(self, request: Request) -> Response:
        m = self.pipe.manifest
        return JSONResponse({"object": "list", "data": [{
            "id": self.model, "object": "model", "created": 0, "owned_by": "nxc",
            "precision": m.precision, "max_context": m.max_context, "draws": self.draws}]})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model})

    async def prometheus(self, request: Request) -> Response:
        batch = self.batcher.stats() if self.batcher is not None else None
        return PlainTextResponse(self.metrics.render(batch), media_type="text/plain; version=0.0.4")

    def shutdown(self) -> None:
        """After the last request (uvicorn drains them on SIGTERM): the scheduler finishes what it holds and stops."""
        if self.batcher is not None:
            self.batcher.close(drain=True)

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")


def model_name(build: str | Path) -> str:
    return "nxc-" + Path(build).resolve().name


def create_app(build: str | Path, *, model: str | None = None, limits: proto.Limits | None = None,
               backend: str = "onnxruntime", providers: list[str] | None = None, threads: int | None = None,
               pipeline: Pipeline | None = None, max_batch: int = 8, max_queue: int = 32) -> Starlette:
    """Load the build (errors surface here, before serving) and return the app. `pipeline` shares a loaded one.
    max_batch 0: no scheduler, one turn per worker thread."""
    pipe = pipeline or Pipeline.load(build, backend=backend, providers=providers, threads=threads)
    srv = Server(pipe, model or model_name(build), limits or proto.Limits(), max_batch=max_batch,
                 max_queue=max_queue)
    routes = [Route("/v1/chat/completions", srv.chat_completions, methods=["POST"]),
              Route("/v1/ground", srv.ground, methods=["POST"]),
              Route("/v1/models", srv.models, methods=["GET"]),
              Route("/healthz", srv.healthz, methods=["GET"]),
              Route("/metrics", srv.prometheus, methods=["GET"]),
              Route("/", srv.page, methods=["GET"]),
              Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(srv.shutdown)

    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed}, lifespan=lifespan)
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
