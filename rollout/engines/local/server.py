"""HTTP front of the local engine: the SGLang 0.5.23 endpoint subset, served with aiohttp.

Endpoints: /generate, /update_weights_from_disk, /update_weight_version, /pause_generation,
/continue_generation, /abort_request, /flush_cache, /health, /health_generate, /model_info,
/server_info (and the deprecated /get_model_info, /get_server_info aliases); the weight endpoints
of the checkpoint bus are in :mod:`.weight_sync`. With an API key
every endpoint except the health checks needs ``Authorization: Bearer <key>``, as SGLang does.

A request passes SGLang's two gates (:mod:`.gate`: the schema, then SamplingParams.verify) before
it reaches the batch, so a bad one is refused alone with SGLang's 400. Sampling options we do not
implement (penalties, grammars, logit bias, beam search) are refused with HTTP 400 rather than
ignored; every other field real clients send is accepted with SGLang's meaning.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from aiohttp import web

from .gate import TOP_K_ALL, ContractError, contract_error, normalize_sampling
from .runner import LocalModel, Request
from .scheduler import Scheduler

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/ready", "/metrics")  # prefixes auth.py leaves open
# Accepted sampling keys we do not implement: only their neutral value is served (anything else is
# refused with 400 rather than ignored; SGLang would honour them).
NEUTRAL = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
           "min_new_tokens": 0, "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
           "logit_bias": None, "stop_regex": None, "beam_width": None, "watermark": None, "choice": None}
# GenerateRequest fields the local engine honours or that are meaningless on one CPU process.
IGNORED_FIELDS = {"rid", "text", "input_ids", "stream", "sampling_params", "return_logprob", "logprob_start_len",
                  "top_logprobs_num", "return_text_in_logprobs", "custom_labels", "priority", "routing_key",
                  "routed_dp_rank", "extra_key", "cache_salt", "session_id", "return_prompt_token_ids",
                  "routed_experts_start_len", "lora_path", "custom_logit_processor"}


class BadRequest(ValueError):
    """A request SGLang refuses with a ValueError: HTTP 400 {"error": {"message": ...}}."""


@dataclass
class Limits:
    """Amplification caps of the local engine (SGLang has none of these exact knobs; they keep one
    client from monopolising a shared test engine)."""

    max_n: int = 64
    """Largest ``sampling_params.n``."""
    max_request_tokens: int = 1 << 20
    """Largest sum over a request's sequences of prompt + max_new_tokens."""


class LocalEngine:
    """State shared by the handlers: model, scheduler, weight version, API key, in-flight rids."""

    def __init__(self, model: LocalModel, scheduler: Scheduler, *, weight_version: str = "default",
                 api_key: Optional[str] = None, info: Optional[Dict[str, Any]] = None,
                 limits: Optional[Limits] = None):
        self.model = model
        self.scheduler = scheduler
        self.weight_version = weight_version
        self.api_key = api_key
        self.info = info or {}
        self.limits = limits or Limits()
        self.started = time.time()
        self.inflight: set = set()  # rids being served (SGLang: tokenizer_manager.rid_to_state)

    # -- /generate: parsing --------------------------------------------------------------------
    def _prompts(self, body: Dict[str, Any]) -> tuple:
        ids = body.get("input_ids")
        if ids is None and body.get("text") is not None:
            if self.model.tokenizer is None:
                raise BadRequest("The engine initialized with skip_tokenizer_init=True cannot accept text prompts.")
            texts = body["text"]
            ids = ([self.model.tokenizer.encode(t, add_special_tokens=False) for t in texts]
                   if isinstance(texts, list) else self.model.tokenizer.encode(texts, add_special_tokens=False))
        if ids is None:
            raise BadRequest("Either text, input_ids or input_embeds should be provided.")
        if not ids:
            raise BadRequest("input_ids cannot be empty.")
        single = isinstance(ids[0], int)
        prompts = [ids] if single else ids
        if any(not p for p in prompts):
            raise BadRequest("input_ids cannot be empty.")
        return prompts, single

    def _requests(self, body: Dict[str, Any]) -> tuple:
        prompts, single = self._prompts(body)

        def per_item(key: str, default: Any, i: int) -> Any:
            v = body.get(key, default)
            return v[i] if isinstance(v, list) and not single else (default if v is None else v)

        rids = body.get("rid")
        if isinstance(rids, list) and len(set(rids)) != len(rids):
            dup = sorted({r for r in rids if rids.count(r) > 1})
            raise BadRequest(f"Duplicate request IDs detected within the request: {dup}")
        reqs: List[Request] = []
        total = 0
        for i, prompt in enumerate(prompts):
            sp = normalize_sampling(per_item("sampling_params", {}, i) or {}, self.model.vocab_size)
            n = sp["n"]
            if not 1 <= n <= self.limits.max_n:
                raise BadRequest(f"sampling_params.n = {n} is outside [1, {self.limits.max_n}] (--max-n)")
            total += n * (len(prompt) + (sp["max_new_tokens"] if sp["max_new_tokens"] is not None else 128))
            if total > self.limits.max_request_tokens:
                raise BadRequest(f"the request asks for more than {self.limits.max_request_tokens} prompt + new "
                                 f"tokens (--max-request-tokens)")
            rid = per_item("rid", None, i) or uuid.uuid4().hex
            for j in range(n):
                reqs.append(self._request(prompt, sp, str(rid) if n == 1 else f"{rid}-{j}",
                                          bool(per_item("return_logprob", False, i)),
                                          int(per_item("logprob_start_len", -1, i)),
                                          int(per_item("top_logprobs_num", 0, i) or 0)))
        return reqs, single and len(reqs) == 1

    def _request(self, prompt, sp: Dict[str, Any], rid: str, return_logprob: bool,
                 logprob_start_len: int, top_logprobs_num: int) -> Request:
        for key, neutral in NEUTRAL.items():
            if sp.get(key) not in (neutral, None, [], {}):
                raise BadRequest(f"sampling_params.{key} = {sp[key]!r} is not supported by the local engine")
        if not all(0 <= t < self.model.vocab_size for t in prompt):
            raise BadRequest(f"input_ids must be ints in [0, {self.model.vocab_size})")
        if len(prompt) >= self.model.max_len:
            raise BadRequest(f"The input ({len(prompt)} tokens) is longer than the model's context length "
                             f"({self.model.max_len} tokens).")
        stop = sp.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if stop and self.model.tokenizer is None:
            raise BadRequest("stop strings need a tokenizer")
        stop_ids = set(sp["stop_token_ids"] or [])
        if not sp["ignore_eos"]:
            stop_ids |= self.model.eos_ids
        seed = sp.get("sampling_seed")
        r = Request(
            rid=rid, input_ids=list(prompt),
            max_new_tokens=sp["max_new_tokens"] if sp["max_new_tokens"] is not None else self.model.max_len,
            temperature=float(sp["temperature"]), top_p=float(sp["top_p"]),
            top_k=-1 if sp["top_k"] >= TOP_K_ALL else int(sp["top_k"]),
            min_p=float(sp["min_p"]), stop_ids=stop_ids, stop_strs=stop,
            return_logprob=return_logprob, top_logprobs_num=top_logprobs_num,
            logprob_start_len=logprob_start_len,
            generator=None if seed is None else torch.Generator().manual_seed(int(seed) % (1 << 63)),
        )
        r.options = sp
        return r

    # -- /generate: answers ----------------------------------------------------------------------
    def _tokens(self, entries: list, text: bool) -> list:
        tok = self.model.tokenizer
        if not text or tok is None:
            return entries
        return [[lp, t, tok.decode([t])] for lp, t, _ in entries]

    def _result(self, r: Request, t0: float, text_in_logprobs: bool) -> Dict[str, Any]:
        sp = r.options
        meta: Dict[str, Any] = {
            "id": r.rid, "finish_reason": r.finish, "prompt_tokens": len(r.input_ids),
            "weight_version": self.weight_version, "num_retractions": 0, "reasoning_tokens": 0,
            "completion_tokens": len(r.output_ids), "cached_tokens": r.cached_tokens,
            "e2e_latency": time.time() - t0,
        }
        if r.return_logprob:
            meta["output_token_logprobs"] = self._tokens(
                [[lp, t, None] for lp, t in zip(r.logprobs, r.output_ids, strict=True)], text_in_logprobs)
            meta["input_token_logprobs"] = self._tokens(r.input_logprobs, text_in_logprobs)
            meta["output_top_logprobs"] = ([self._tokens(row, text_in_logprobs) for row in r.top_logprobs]
                                           if r.top_logprobs_num else None)
        out: Dict[str, Any] = {"text": "", "output_ids": list(r.output_ids), "meta_info": meta}
        tok = self.model.tokenizer
        if tok is not None:
            text = tok.decode(r.output_ids, skip_special_tokens=sp["skip_special_tokens"],
                              spaces_between_special_tokens=sp["spaces_between_special_tokens"])
            if r.matched_str and not sp["no_stop_trim"] and r.matched_str in text:
                text = text[: text.index(r.matched_str)]
            out["text"] = text
        return out

    def check(self, body: Any) -> tuple:
        """Both of SGLang's gates; raises ContractError (the schema) or BadRequest (a ValueError)."""
        err = contract_error(body)
        if err is not None:
            raise ContractError(err)
        try:
            reqs, single = self._requests(body)
        except BadRequest:
            raise
        except ValueError as e:  # SamplingParams.verify and friends
            raise BadRequest(str(e)) from None
        for r in reqs:
            if r.rid in self.inflight:
                raise BadRequest(f"Duplicate request ID detected: {r.rid}")
        return reqs, single

    async def run(self, reqs: List[Request], on_token=None) -> List[Request]:
        """Submit ``reqs`` and wait for all; cancelling (a client that went away) aborts them."""
        loop = asyncio.get_running_loop()
        futures = []
        self.inflight.update(r.rid for r in reqs)
        try:
            for r in reqs:
                fut = loop.create_future()

                def done(req, fut=fut):
                    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(req))

                if on_token is not None:
                    r.on_token = lambda: loop.call_soon_threadsafe(on_token)
                self.scheduler.submit(r, done)
                futures.append(fut)
            return await asyncio.gather(*futures)
        except asyncio.CancelledError:
            for r in reqs:
                self.scheduler.abort(r.rid)  # queued work is dropped, running rows leave the batch
            raise
        finally:
            self.inflight.difference_update(r.rid for r in reqs)

    async def generate(self, body: Dict[str, Any]) -> Any:
        reqs, single = self.check(body)
        t0 = time.time()
        finished = await self.run(reqs)
        text_lp = bool(body.get("return_text_in_logprobs"))
        outs = [self._result(r, t0, text_lp) for r in finished]
        return outs[0] if single else outs


def _authorized(engine: LocalEngine, request: web.Request) -> bool:
    """SGLang's auth.py: ``<scheme> <token>`` with the scheme ``bearer`` in any case, the token
    compared in constant time; /health*, /ready* and /metrics* are open."""
    if not engine.api_key or request.path.startswith(OPEN_PATHS):
        return True
    parts = request.headers.get("Authorization", "").split(" ", 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return False
    return hmac.compare_digest(parts[1].encode(), engine.api_key.encode())


async def _json(request: web.Request, any_value: bool = False) -> Any:
    """The JSON body (a dict unless ``any_value``: /generate leaves the judgment to the schema gate)."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict) and not any_value:
        raise BadRequest("the body must be a JSON object")
    return body
