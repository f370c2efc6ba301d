"""Async HTTP client of one SGLang-protocol engine (SGLang itself or the local CPU engine).

One pooled ``aiohttp`` session per engine; per-call timeouts; retries with exponential backoff and
jitter on transient failures (connection refused/reset, 429, 502, 503, 504); explicit abort by
request id. The request bodies follow SGLang 0.5.23 (see :mod:`rollout.engines.protocol`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from typing import Any, Dict, List, Optional, Sequence

import aiohttp

from ..config import ClientConfig
from .protocol import (
    EngineHTTPError,
    EngineUnavailable,
    GenerateOutput,
    MalformedResponse,
    generate_batch_payload,
    generate_payload,
    init_weights_update_group_payload,
    parse_generate,
    parse_input_logprobs,
    update_weights_from_disk_payload,
    update_weights_from_distributed_payload,
    update_weights_from_tensor_payload,
)

logger = logging.getLogger(__name__)

RETRY_STATUS = (429, 502, 503, 504)
MAX_BACKOFF_S = 30.0


class EngineClient:
    """Client of one engine at ``url``. Use ``async with`` or call :meth:`close`."""

    def __init__(self, url: str, *, api_key: Optional[str] = None, config: Optional[ClientConfig] = None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.cfg = config or ClientConfig()
        self._session: Optional[aiohttp.ClientSession] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # -- session ---------------------------------------------------------------------------
    def _sess(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is not None and self._loop is not loop:
            self._session = None  # pools are per event loop; the old loop owns the old session
        if self._session is None or self._session.closed:
            self._loop = loop
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            connector = aiohttp.TCPConnector(limit=self.cfg.max_connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(connector=connector, headers=headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> "EngineClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"EngineClient({self.url})"

    # -- core request with retries ---------------------------------------------------------
    async def _request(self, method: str, path: str, *, json: Any = None, timeout_s: float,
                       retries: Optional[int] = None, expect_json: bool = True,
                       retry_timeouts: bool = True) -> Any:
        retries = self.cfg.max_retries if retries is None else retries
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.cfg.connect_timeout_s)
        delay = self.cfg.retry_backoff_s
        last: Optional[BaseException] = None
        for attempt in range(retries + 1):
            if attempt:
                sleep = min(delay, MAX_BACKOFF_S) * (0.5 + random.random())
                logger.warning("engine %s: %s %s failed (%s); retry %d/%d in %.2f s",
                               self.url, method, path, last, attempt, retries, sleep)
                await asyncio.sleep(sleep)
                delay *= 2
            try:
                async with self._sess().request(method, self.url + path, json=json, timeout=timeout) as resp:
                    body = await resp.read()
                    if resp.status in RETRY_STATUS:
                        last = EngineHTTPError(self.url, resp.status, body.decode(errors="replace"))
                        continue
                    if resp.status >= 400:
                        raise EngineHTTPError(self.url, resp.status, body.decode(errors="replace"))
                    if not expect_json:
                        return body.decode(errors="replace")
                    try:
                        return await resp.json(content_type=None)
                    except ValueError as e:
                        raise MalformedResponse(self.url, f"{path} answered invalid JSON: {e}") from None
            except asyncio.TimeoutError as e:
                # A timed-out generation may still run on the engine: re-sending it doubles the work.
                if not retry_timeouts:
                    raise EngineUnavailable(self.url, f"{path}: no answer within {timeout_s:.0f} s") from e
                last = e
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                last = e
        if isinstance(last, EngineHTTPError):
            raise EngineUnavailable(self.url, f"{path}: {last} after {retries + 1} attempts")
        raise EngineUnavailable(self.url, f"{path}: {type(last).__name__}: {last} after {retries + 1} attempts")

    # -- generation ------------------------------------------------------------------------
    async def generate(self, input_ids: Sequence[int], params: Dict[str, Any], *,
                       rid: Optional[str] = None, return_logprob: bool = True) -> GenerateOutput:
        """POST /generate for one prompt; log-probs validated against ``output_ids``.

        Cancelling the awaiting task sends /abort_request for ``rid`` (best effort).
        """
        rid = rid or uuid.uuid4().hex
        body = generate_payload(input_ids, params, rid=rid, return_logprob=return_logprob)
        try:
            obj = await self._request("POST", "/generate", json=body, timeout_s=self.cfg.request_timeout_s,
                                      retry_timeouts=False)
        except (asyncio.CancelledError, EngineUnavailable):
            asyncio.ensure_future(self._abort_quietly(rid))
            raise
        if isinstance(obj, list) and len(obj) == 1:
            obj = obj[0]
        return parse_generate(obj, self.url, expect_logprobs=return_logprob)

    async def generate_batch(self, input_ids: Sequence[Sequence[int]], params: Sequence[Dict[str, Any]], *,
                             rids: Optional[Sequence[str]] = None,
                             return_logprob: bool = True) -> List[GenerateOutput]:
        """POST /generate for several prompts in one request (SGLang's batch form); one output per
        prompt, in order. The engine serves each item as its own request (its own sampling params and
        seed), so this is :meth:`generate` per item with one HTTP round trip. Cancelling aborts them all."""
        rids = list(rids) if rids is not None else [uuid.uuid4().hex for _ in input_ids]
        body = generate_batch_payload(input_ids, params, rids, return_logprob=return_logprob)
        try:
            obj = await self._request("POST", "/generate", json=body, timeout_s=self.cfg.request_timeout_s,
                                      retry_timeouts=False)
        except (asyncio.CancelledError, EngineUnavailable):
            for rid in rids:
                asyncio.ensure_future(self._abort_quietly(rid))
            raise
        if isinstance(obj, dict) and len(rids) == 1:
            obj = [obj]  # a batch of one may come back unwrapped
        if not isinstance(obj, list) or len(obj) != len(rids):
            got = f"a list of {len(obj)}" if isinstance(obj, list) else type(obj).__name__
            raise MalformedResponse(self.url, f"a batch /generate of {len(rids)} prompts answered {got}")
        return [parse_generate(o, self.url, expect_logprobs=return_logprob) for o in obj]

    async def _abort_quietly(self, rid: str) -> None:
        try:
            await self.abort(rid)
        except Exception as e:  # the engine may be gone; an abort is advisory
            logger.debug("engine %s: abort of %s failed: %s", self.url, rid, e)

    async def abort(self, rid: Optional[str] = None, *, abort_all: bool = False) -> None:
        """POST /abort_request (AbortReq: ``rid`` or ``abort_all``)."""
        body: Dict[str, Any] = {"abort_all": bool(abort_all)}
        if rid is not None:
            body["rid"] = rid
        await self._request("POST", "/abort_request", json=body, timeout_s=self.cfg.connect_timeout_s,
                            retries=0, expect_json=False)

    # -- control ---------------------------------------------------------------------------
    async def health(self, timeout_s: float = 5.0) -> bool:
        """GET /health: True on 200, False on anything else (never raises)."""
        try:
            await self._request("GET", "/health", timeout_s=timeout_s, retries=0, expect_json=False)
            return True
        except Exception:
            return False

    async def health_generate(self, timeout_s: float = 30.0) -> bool:
        """GET /health_generate (the engine generates one token)."""
        try:
            await self._request("GET", "/health_generate", timeout_s=timeout_s, retries=0, expect_json=False)
            return True
        except Exception:
            return False

    async def model_info(self) -> Dict[str, Any]:
        """GET /model_info (model_path, weight_version, ...)."""
        return await self._request("GET", "/model_info", timeout_s=self.cfg.control_timeout_s)

    async def server_info(self) -> Dict[str, Any]:
        return await self._request("GET", "/server_info", timeout_s=self.cfg.control_timeout_s)

    async def weight_version(self) -> Optional[str]:
        version = (await self.model_info()).get("weight_version")
        return None if version is None else str(version)

    async def pause_generation(self, mode: str = "abort") -> Dict[str, Any]:
        """POST /pause_generation {"mode": "abort" | "retract" | "in_place"}."""
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause mode must be abort, retract or in_place, got {mode!r}")
        return await self._request("POST", "/pause_generation", json={"mode": mode},
                                   timeout_s=self.cfg.control_timeout_s)

    async def continue_generation(self) -> Dict[str, Any]:
        """POST /continue_generation {}."""
        return await self._request("POST", "/continue_generation", json={},
                                   timeout_s=self.cfg.control_timeout_s)

    async def flush_cache(self) -> None:
        await self._request("POST", "/flush_cache", timeout_s=self.cfg.control_timeout_s, expect_json=False)

    async def update_weights_from_disk(self, model_path: str, *, weight_version: Optional[str] = None,
                                       flush_cache: bool = True, abort_all_requests: bool = False,
                                       load_format: Optional[str] = None) -> Dict[str, Any]:
        """POST /update_weights_from_disk; raises unless the engine reports success."""
        body = update_weights_from_disk_payload(model_path, weight_version=weight_version,
                                                flush_cache=flush_cache,
                                                abort_all_requests=abort_all_requests,
                                                load_format=load_format)
        try:
            res = await self._request("POST", "/update_weights_from_disk", json=body,
                                      timeout_s=self.cfg.control_timeout_s, retries=0)
        except EngineHTTPError as e:
            raise EngineHTTPError(self.url, e.status, f"update_weights_from_disk failed: {e}") from None
        if not isinstance(res, dict) or not res.get("success"):
            raise MalformedResponse(self.url, f"update_weights_from_disk did not succeed: {res!r}")
        return res

    # -- weight updates inside a session (distributed, tensor) ----------------------------------
    async def _control(self, path: str, body: Dict[str, Any], *, timeout_s: Optional[float] = None) -> Dict[str, Any]:
        """POST a control call that answers ``{"success", "message"}``; raises unless it succeeded."""
        try:
            res = await self._request("POST", path, json=body, retries=0,
                                      timeout_s=timeout_s or self.cfg.control_timeout_s)
        except EngineHTTPError as e:
            raise EngineHTTPError(self.url, e.status, f"{path.lstrip('/')} failed: {e}") from None
        if not isinstance(res, dict) or not res.get("success"):
            raise MalformedResponse(self.url, f"{path.lstrip('/')} did not succeed: {res!r}")
        return res

    async def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str = "nccl") -> Dict[str, Any]:
        """POST /init_weights_update_group (answers once every rank has joined the group)."""
        return await self._control("/init_weights_update_group", init_weights_update_group_payload(
            master_address, master_port, rank_offset, world_size, group_name, backend))

    async def destroy_weights_update_group(self, group_name: str) -> Dict[str, Any]:
        return await self._control("/destroy_weights_update_group", {"group_name": group_name})

    async def begin_weight_update(self) -> Dict[str, Any]:
        """POST /begin_weight_update: opens the session distributed/tensor updates need."""
        return await self._control("/begin_weight_update", {})

    async def end_weight_update(self) -> Dict[str, Any]:
        """POST /end_weight_update: closes the session (the engine finalises the new weights)."""
        return await self._control("/end_weight_update", {})

    async def update_weights_from_distributed(self, names, dtypes, shapes, group_name: str, *,
                                              weight_version: Optional[str] = None,
                                              load_format: Optional[str] = "flattened_bucket") -> Dict[str, Any]:
        """POST /update_weights_from_distributed; the caller broadcasts the bucket meanwhile."""
        return await self._control("/update_weights_from_distributed", update_weights_from_distributed_payload(
            names, dtypes, shapes, group_name, weight_version=weight_version, load_format=load_format))

    async def update_weights_from_tensor(self, serialized: Sequence[str], *, load_format: Optional[str] = None,
                                         weight_version: Optional[str] = None) -> Dict[str, Any]:
        return await self._control("/update_weights_from_tensor", update_weights_from_tensor_payload(
            serialized, load_format=load_format, weight_version=weight_version))

    async def update_weight_version(self, version: str, *, abort_all_requests: bool = False) -> Dict[str, Any]:
        """POST /update_weight_version (UpdateWeightVersionReqInput: new_version, abort_all_requests)."""
        return await self._control("/update_weight_version", {"new_version": str(version),
                                                              "abort_all_requests": abort_all_requests})

    async def get_weights_by_name(self, name: str, truncate_size: int = 100) -> Any:
        """POST /get_weights_by_name: the parameter's values (truncated to ``truncate_size`` per row)."""
        return await self._request("POST", "/get_weights_by_name", json={"name": name, "truncate_size": truncate_size},
                                   timeout_s=self.cfg.control_timeout_s, retries=0)

    async def prompt_logprobs(self, input_ids: Sequence[int], start: int) -> list:
        """Log-probs of ``input_ids[start:]`` given their prefixes, at temperature 1 (scoring request)."""
        if not 0 < start < len(input_ids):
            raise ValueError(f"start must be in (0, {len(input_ids)}), got {start}")
        body = generate_payload(input_ids, {"max_new_tokens": 1, "temperature": 1.0, "n": 1},
                                logprob_start_len=start)
        obj = await self._request("POST", "/generate", json=body, timeout_s=self.cfg.control_timeout_s,
                                  retry_timeouts=False)
        return parse_input_logprobs(obj, self.url, len(input_ids) - start)
