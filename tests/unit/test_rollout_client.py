"""The engine client against scripted in-process HTTP servers (127.0.0.1, stopped in each test)."""

import asyncio
import contextlib

import pytest
from aiohttp import web

from rollout.config import ClientConfig
from rollout.engines.client import EngineClient
from rollout.engines.processes import free_port
from rollout.engines.protocol import EngineHTTPError, EngineUnavailable, MalformedResponse, sampling_params
from tests.polling import async_until

FAST = ClientConfig(max_retries=3, retry_backoff_s=0.01, request_timeout_s=5, connect_timeout_s=2)


def ok_answer(body, version="7"):
    ids = [4, 5, 6]
    return {"output_ids": ids, "text": "xyz",
            "meta_info": {"id": body.get("rid"), "finish_reason": {"type": "length", "length": 3},
                          "prompt_tokens": len(body["input_ids"]), "weight_version": version,
                          "output_token_logprobs": [[-1.0, t, None] for t in ids]}}


@contextlib.asynccontextmanager
async def serve(routes):
    """Serve ``routes`` {(method, path): handler} on 127.0.0.1; record every request."""
    seen = []
    app = web.Application()

    def wrap(handler, path):
        async def h(request):
            body = await request.json() if request.can_read_body else None
            seen.append((path, body, request.headers.get("Authorization")))
            return await handler(request, body)
        return h

    for (method, path), handler in routes.items():
        app.router.add_route(method, path, wrap(handler, path))
    runner = web.AppRunner(app, shutdown_timeout=0.1, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def test_retries_transient_errors_then_succeeds():
    calls = {"n": 0}

    async def gen(request, body):
        calls["n"] += 1
        if calls["n"] <= 2:
            return web.Response(status=503, text="warming up")
        return web.json_response(ok_answer(body))

    async def main():
        async with serve({("POST", "/generate"): gen}) as (url, seen):
            async with EngineClient(url, api_key="k", config=FAST) as c:
                out = await c.generate([1, 2], sampling_params(max_new_tokens=3), rid="abc")
            return out, seen

    out, seen = asyncio.run(main())
    assert calls["n"] == 3 and out.output_ids == [4, 5, 6] and out.logprobs == [-1.0] * 3
    assert out.weight_version == "7" and out.rid == "abc"
    path, body, auth = seen[-1]
    assert auth == "Bearer k" and body["rid"] == "abc" and body["return_logprob"] is True
    assert body["input_ids"] == [1, 2] and body["sampling_params"]["max_new_tokens"] == 3


def test_client_errors_are_not_retried():
    calls = {"n": 0}

    async def gen(request, body):
        calls["n"] += 1
        return web.Response(status=400, text="bad input_ids")

    async def main():
        async with serve({("POST", "/generate"): gen}) as (url, _):
            async with EngineClient(url, config=FAST) as c:
                await c.generate([1], sampling_params(max_new_tokens=1))

    with pytest.raises(EngineHTTPError, match="400"):
        asyncio.run(main())
    assert calls["n"] == 1


def test_malformed_answer_names_the_engine():
    async def gen(request, body):
        ans = ok_answer(body)
        ans["meta_info"]["output_token_logprobs"] = ans["meta_info"]["output_token_logprobs"][:2]
        return web.json_response(ans)

    async def main():
        async with serve({("POST", "/generate"): gen}) as (url, _):
            async with EngineClient(url, config=FAST) as c:
                try:
                    await c.generate([1], sampling_params(max_new_tokens=3))
                except MalformedResponse as e:
                    return url, e

    url, err = asyncio.run(main())
    assert url in str(err) and "2 log-probs for 3 output tokens" in str(err)


def test_unreachable_engine_raises_after_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens

    async def main():
        async with EngineClient(url, config=FAST) as c:
            assert await c.health(timeout_s=1) is False
            await c.generate([1], sampling_params(max_new_tokens=1))

    with pytest.raises(EngineUnavailable, match="after 4 attempts"):
        asyncio.run(main())


def test_timeout_is_not_retried_and_aborts():
    calls = {"gen": 0}

    async def gen(request, body):
        calls["gen"] += 1
        await asyncio.sleep(3)
        return web.json_response(ok_answer(body))

    async def abort(request, body):
        return web.Response(status=200)

    async def main():
        cfg = ClientConfig(max_retries=3, retry_backoff_s=0.01, request_timeout_s=0.5)
        async with serve({("POST", "/generate"): gen, ("POST", "/abort_request"): abort}) as (url, seen):
            async with EngineClient(url, config=cfg) as c:
                with pytest.raises(EngineUnavailable, match="no answer within"):
                    await c.generate([1], sampling_params(max_new_tokens=1), rid="slow")
                await async_until(lambda: any(p == "/abort_request" for p, _, _ in seen), "the abort (sent later)")
            return seen

    seen = asyncio.run(main())
    assert calls["gen"] == 1
    assert ("/abort_request", {"abort_all": False, "rid": "slow"}, None) in seen


def test_cancellation_sends_abort():
    async def gen(request, body):
        await asyncio.sleep(5)
        return web.json_response(ok_answer(body))

    async def abort(request, body):
        return web.Response(status=200)

    async def main():
        async with serve({("POST", "/generate"): gen, ("POST", "/abort_request"): abort}) as (url, seen):
            async with EngineClient(url, config=FAST) as c:
                task = asyncio.ensure_future(c.generate([1], sampling_params(max_new_tokens=1), rid="r9"))
                await async_until(lambda: any(p == "/generate" for p, _, _ in seen), "the request")  # in flight
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await async_until(lambda: any(p == "/abort_request" for p, _, _ in seen), "the abort")
            return seen

    assert any(p == "/abort_request" and b["rid"] == "r9" for p, b, _ in asyncio.run(main()))


def test_control_calls_use_sglang_bodies():
    async def ok(request, body):
        return web.json_response({"message": "ok", "status": "ok"})

    async def update(request, body):
        return web.json_response({"success": True, "message": "done", "num_paused_requests": 0})

    async def info(request, body):
        return web.json_response({"model_path": "/m", "weight_version": "12"})

    routes = {("POST", "/pause_generation"): ok, ("POST", "/continue_generation"): ok,
              ("POST", "/update_weights_from_disk"): update, ("GET", "/model_info"): info}

    async def main():
        async with serve(routes) as (url, seen):
            async with EngineClient(url, api_key="key", config=FAST) as c:
                await c.pause_generation("retract")
                await c.update_weights_from_disk("/ckpt/v12", weight_version=12)
                await c.continue_generation()
                version = await c.weight_version()
                with pytest.raises(ValueError):
                    await c.pause_generation("sideways")
            return seen, version

    seen, version = asyncio.run(main())
    assert version == "12"
    bodies = {p: b for p, b, _ in seen}
    assert bodies["/pause_generation"] == {"mode": "retract"}
    assert bodies["/continue_generation"] == {}
    assert bodies["/update_weights_from_disk"] == {"model_path": "/ckpt/v12", "weight_version": "12",
                                                   "flush_cache": True, "abort_all_requests": False}
    assert all(auth == "Bearer key" for _, _, auth in seen)


def test_failed_weight_update_raises():
    async def update(request, body):
        return web.json_response({"success": False, "message": "shape mismatch", "num_paused_requests": 0},
                                 status=400)

    async def main():
        async with serve({("POST", "/update_weights_from_disk"): update}) as (url, _):
            async with EngineClient(url, config=FAST) as c:
                await c.update_weights_from_disk("/x")

    with pytest.raises(EngineHTTPError, match="shape mismatch"):
        asyncio.run(main())
