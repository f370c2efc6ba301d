"""HTTP front of the local engine: the SGLang 0.5.23 endpoint subset, served with aiohttp.

Endpoints: /generate, /update_weights_from_disk, /update_weight_version, /pause_generation,
/continue_generation, /abort_request, /flush_cache, /health, /health_generate, /model_info,
/server_info (and the deprecated /get_model_info, /get_server_info aliases); the weight endpoints
of the checkpoint bus are in :mod:`.weight_sync`. With an API key
every endpoint except the health checks needs ``Authorization: Bearer <key>``, as SGLang does.
Sampling options we do not implement (penalties, grammars, logit bias, streaming) are refused
with HTTP 400 rather than ignored.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from typing import Any, Dict, List, Optional

import torch
from aiohttp import web

from .runner import LocalModel, Request
from .scheduler import Scheduler

logger = logging.getLogger(__name__)

OPEN_PATHS = {"/health", "/health_generate"}
# Accepted sampling keys whose default value we honour; anything else non-default is refused.
NEUTRAL = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
           "min_new_tokens": 0, "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
           "logit_bias": None, "custom_params": None, "stop_regex": None, "spaces_between_special_tokens": True,
           "stream_interval": None, "beam_width": None, "watermark": None}
SUPPORTED = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids",
             "ignore_eos", "no_stop_trim", "skip_special_tokens", "n", "sampling_seed"}


class BadRequest(ValueError):
    pass


class LocalEngine:
    """State shared by the handlers: model, scheduler, weight version, API key."""

    def __init__(self, model: LocalModel, scheduler: Scheduler, *, weight_version: str = "default",
                 api_key: Optional[str] = None, info: Optional[Dict[str, Any]] = None):
        self.model = model
        self.scheduler = scheduler
        self.weight_version = weight_version
        self.api_key = api_key
        self.info = info or {}
        self.started = time.time()

    # -- /generate -------------------------------------------------------------------------
    def _requests(self, body: Dict[str, Any]) -> tuple:
        if body.get("stream"):
            raise BadRequest("streaming is not supported by the local engine")
        ids = body.get("input_ids")
        if ids is None and body.get("text") is not None:
            if self.model.tokenizer is None:
                raise BadRequest("'text' needs a tokenizer; send input_ids")
            texts = body["text"]
            ids = ([self.model.tokenizer.encode(t, add_special_tokens=False) for t in texts]
                   if isinstance(texts, list) else self.model.tokenizer.encode(texts, add_special_tokens=False))
        if not isinstance(ids, list) or not ids:
            raise BadRequest("input_ids (or text) is required")
        single = isinstance(ids[0], int)
        prompts = [ids] if single else ids

        def per_item(key: str, default: Any, i: int) -> Any:
            v = body.get(key, default)
            return v[i] if isinstance(v, list) and not single else (default if v is None else v)

        reqs: List[Request] = []
        for i, prompt in enumerate(prompts):
            sp = per_item("sampling_params", {}, i) or {}
            n = int(sp.get("n", 1) or 1)
            rid = per_item("rid", None, i) or uuid.uuid4().hex
            for j in range(n):
                reqs.append(self._request(prompt, sp, rid if n == 1 else f"{rid}-{j}",
                                          bool(per_item("return_logprob", False, i)),
                                          int(per_item("logprob_start_len", -1, i)),
                                          int(per_item("top_logprobs_num", 0, i) or 0)))
        return reqs, single and len(reqs) == 1

    def _request(self, prompt, sp: Dict[str, Any], rid: str, return_logprob: bool,
                 logprob_start_len: int, top_logprobs_num: int) -> Request:
        for key, value in sp.items():
            if key not in SUPPORTED and key in NEUTRAL and value not in (NEUTRAL[key], None):
                raise BadRequest(f"sampling_params.{key} = {value!r} is not supported by the local engine")
        if not all(isinstance(t, int) and 0 <= t < self.model.vocab_size for t in prompt):
            raise BadRequest(f"input_ids must be ints in [0, {self.model.vocab_size})")
        if len(prompt) >= self.model.max_len:
            raise BadRequest(f"prompt of {len(prompt)} tokens exceeds the context ({self.model.max_len})")
        stop = sp.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if stop and self.model.tokenizer is None:
            raise BadRequest("stop strings need a tokenizer")
        stop_ids = {int(t) for t in (sp.get("stop_token_ids") or [])}
        if not sp.get("ignore_eos", False):
            stop_ids |= self.model.eos_ids
        seed = sp.get("sampling_seed")
        temperature = sp.get("temperature")
        return Request(
            rid=str(rid), input_ids=list(prompt),
            max_new_tokens=int(sp.get("max_new_tokens", 128) if sp.get("max_new_tokens") is not None else 128),
            temperature=1.0 if temperature is None else float(temperature),
            top_p=float(sp.get("top_p", 1.0) or 1.0), top_k=int(sp.get("top_k", -1) or -1),
            min_p=float(sp.get("min_p", 0.0) or 0.0), stop_ids=stop_ids, stop_strs=stop,
            return_logprob=return_logprob, top_logprobs_num=top_logprobs_num,
            logprob_start_len=logprob_start_len,
            generator=None if seed is None else torch.Generator().manual_seed(int(seed)),
        )

    def _result(self, r: Request, sp_trim: bool, skip_special: bool, t0: float) -> Dict[str, Any]:
        meta: Dict[str, Any] = {
            "id": r.rid, "finish_reason": r.finish, "prompt_tokens": len(r.input_ids),
            "completion_tokens": len(r.output_ids), "cached_tokens": 0,
            "weight_version": self.weight_version, "e2e_latency": time.time() - t0,
        }
        if r.return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(r.logprobs, r.output_ids)]
            meta["input_token_logprobs"] = r.input_logprobs
            meta["output_top_logprobs"] = r.top_logprobs if r.top_logprobs_num else None
        out: Dict[str, Any] = {"output_ids": r.output_ids, "meta_info": meta}
        tok = self.model.tokenizer
        if tok is not None:
            text = tok.decode(r.output_ids, skip_special_tokens=skip_special)
            if r.matched_str and sp_trim and r.matched_str in text:
                text = text[: text.index(r.matched_str)]
            out["text"] = text
        return out

    async def generate(self, body: Dict[str, Any]) -> Any:
        reqs, single = self._requests(body)
        loop = asyncio.get_running_loop()
        t0 = time.time()
        futures = []
        for r in reqs:
            fut = loop.create_future()

            def done(req, fut=fut):
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(req))

            self.scheduler.submit(r, done)
            futures.append(fut)
        try:
            finished = await asyncio.gather(*futures)
        except asyncio.CancelledError:
            for r in reqs:
                self.scheduler.abort(r.rid)
            raise
        sp = body.get("sampling_params") or {}
        sp = sp[0] if isinstance(sp, list) and sp else sp
        outs = [self._result(r, not sp.get("no_stop_trim", False), sp.get("skip_special_tokens", True), t0)
                for r in finished]
        return outs[0] if single else outs


def _authorized(engine: LocalEngine, request: web.Request) -> bool:
    if not engine.api_key or request.path in OPEN_PATHS:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {engine.api_key}".encode())


async def _json(request: web.Request) -> Dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body
