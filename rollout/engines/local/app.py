"""aiohttp routes of the local engine (request bodies and answers as in SGLang 0.5.23)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, Dict

from aiohttp import web

from ..protocol import SGLANG_VERSION
from .gate import ContractError
from .server import BadRequest, LocalEngine, _authorized, _json
from .weight_sync import WeightSync
from .weight_sync import add_routes as add_weight_routes

logger = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", LocalEngine)


@web.middleware
async def _guard(request: web.Request, handler):
    engine = request.app[ENGINE]
    if not _authorized(engine, request):
        return web.json_response({"error": "unauthorized"}, status=401)
    try:
        return await handler(request)
    except ContractError as e:  # http_server.generate_request: the schema gate
        return web.json_response({"error": str(e)}, status=400)
    except BadRequest as e:  # http_server._create_error_response of a ValueError
        return web.json_response({"error": {"message": str(e)}}, status=400)


async def generate(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await _json(request, any_value=True)
    if isinstance(body, dict) and body.get("stream") is True:
        return await _stream(request, engine, body)
    return web.json_response(await engine.generate(body))


async def _stream(request: web.Request, engine: LocalEngine, body: Dict[str, Any]) -> web.StreamResponse:
    """SGLang's /generate stream: ``data: <response so far>`` per update (text, output_ids and
    log-probs cumulative, as with SGLang's default ``--stream-output`` off; a batch's items carry
    their ``index``), then ``data: [DONE]``. Errors found before the stream starts are a plain 400."""
    reqs, single = engine.check(body)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    wake = asyncio.Event()
    task = asyncio.ensure_future(engine.run(reqs, on_token=wake.set))
    t0, sent = time.time(), [0] * len(reqs)
    text_lp = bool(body.get("return_text_in_logprobs"))
    try:
        while True:
            done = task.done()
            for i, r in enumerate(reqs):
                n = len(r.output_ids)
                # progress chunks while running; the final one (with its finish_reason) once, at the end
                if sent[i] >= 0 and (done or (n > sent[i] and r.finish is None)):
                    out = engine._result(r, t0, text_lp)
                    if not single:
                        out["index"] = i
                    if not done:
                        out["meta_info"]["finish_reason"] = None
                    await resp.write(b"data: " + json.dumps(out).encode() + b"\n\n")
                    sent[i] = -1 if done else n
            if done:
                task.result()
                break
            wake.clear()
            await asyncio.wait([task, asyncio.ensure_future(wake.wait())], return_when=asyncio.FIRST_COMPLETED)
    except (ConnectionResetError, asyncio.CancelledError):
        task.cancel()  # the client went away: abort its requests
        raise
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


HEALTH_CHECK_TIMEOUT_S = float(os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", 20))


async def health_generate(request: web.Request) -> web.Response:
    """SGLang: generate one token; 200 as soon as the engine answers, 503 if it does not within
    SGLANG_HEALTH_CHECK_TIMEOUT (20 s). A paused engine holds the probe too, so a pause longer than
    the timeout answers 503, as SGLang does."""
    engine = request.app[ENGINE]
    body = {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
    try:
        await asyncio.wait_for(engine.generate(body), timeout=HEALTH_CHECK_TIMEOUT_S)
    except Exception as e:
        logger.error("health_generate failed: %s", e or type(e).__name__)
        return web.Response(status=503)
    return web.Response(status=200)


async def model_info(request: web.Request) -> web.Response:
    """The keys of SGLang's /model_info (``model_path`` moves with a disk update, as in SGLang)."""
    engine = request.app[ENGINE]
    cfg = engine.model.config
    return web.json_response({
        "model_path": engine.model.model_path, "tokenizer_path": engine.model.tokenizer_path,
        "served_model_name": engine.info.get("served_model_name", engine.model.model_path),
        "is_generation": True, "preferred_sampling_params": None,
        "weight_version": engine.weight_version, "load_format": "auto", "reasoning_parser": None,
        "tool_call_parser": None, "disaggregation_mode": "null", "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": getattr(cfg, "model_type", None), "architectures": getattr(cfg, "architectures", None),
    })


async def server_info(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    state: Dict[str, Any] = dict(engine.scheduler.stats)
    state.update(engine.scheduler.load())
    state["paused"] = engine.scheduler.paused
    return web.json_response({
        **engine.info, "model_path": engine.model.model_path, "precision": engine.model.precision,
        "version": f"local-engine (SGLang {SGLANG_VERSION} protocol subset)", "frontend": "rollout.engines.local",
        "startup_time": engine.started, "internal_states": [state],
    })


async def update_weight_version(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await _json(request)
    if "new_version" not in body:
        raise BadRequest("new_version is required")
    if body.get("abort_all_requests", True):
        engine.scheduler.abort(abort_all=True)
    engine.weight_version = str(body["new_version"])
    return web.json_response({"success": True, "message": f"Weight version updated to {engine.weight_version}",
                              "new_version": engine.weight_version})


async def pause_generation(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    mode = (await _json(request)).get("mode", "abort")
    if mode not in ("abort", "retract", "in_place"):
        raise BadRequest(f"mode must be abort, retract or in_place, got {mode!r}")
    await asyncio.to_thread(engine.scheduler.pause, mode)
    return web.json_response({"message": "Generation paused successfully.", "status": "ok"})


async def continue_generation(request: web.Request) -> web.Response:
    request.app[ENGINE].scheduler.resume()
    return web.json_response({"message": "Generation continued successfully.", "status": "ok"})


async def abort_request(request: web.Request) -> web.Response:
    body = await _json(request)
    request.app[ENGINE].scheduler.abort(body.get("rid") or None, abort_all=bool(body.get("abort_all")))
    return web.Response(status=200)


FLUSHED = ("Cache flushed.\nPlease check backend logs for more details. "
           "(When there are running or waiting requests, the operation will not be performed.)\n")


async def flush_cache(request: web.Request) -> web.Response:
    """SGLang's /flush_cache: empties the prefix cache only when no request runs (queued ones count
    too unless paused: Scheduler.is_fully_idle(ignore_waiting=paused)); else 400."""
    if request.app[ENGINE].scheduler.flush_cache():
        return web.Response(text=FLUSHED)
    return web.Response(text="Flush cache failed.\n", status=400)


def build_app(engine: LocalEngine) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=64 * 1024 * 1024)
    app[ENGINE] = engine
    r = app.router
    r.add_route("POST", "/generate", generate)
    r.add_route("PUT", "/generate", generate)
    r.add_get("/health", health)
    r.add_get("/health_generate", health_generate)
    for path in ("/model_info", "/get_model_info"):
        r.add_get(path, model_info)
    for path in ("/server_info", "/get_server_info"):
        r.add_get(path, server_info)
    if getattr(engine, "weights", None) is None:
        engine.weights = WeightSync(engine)
    add_weight_routes(app, lambda request: request.app[ENGINE].weights)
    r.add_post("/update_weight_version", update_weight_version)
    r.add_post("/pause_generation", pause_generation)
    r.add_post("/continue_generation", continue_generation)
    r.add_post("/abort_request", abort_request)
    r.add_get("/flush_cache", flush_cache)
    r.add_post("/flush_cache", flush_cache)

    async def _abort_all(app: web.Application) -> None:
        engine.scheduler.abort(abort_all=True)  # in-flight handlers answer 'abort' and return

    async def _close(app: web.Application) -> None:
        await asyncio.to_thread(engine.scheduler.close)

    app.on_shutdown.append(_abort_all)
    app.on_cleanup.append(_close)
    return app
