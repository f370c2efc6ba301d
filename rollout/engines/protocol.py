"""The subset of SGLang's HTTP protocol we speak, and strict parsing of its answers.

Targeted release: **SGLang 0.5.23** (`sglang/srt/managers/io_struct.py::GenerateReqInput`,
`SamplingParams` in `sglang/srt/sampling/sampling_params.py`, routes in
`sglang/srt/entrypoints/http_server.py`). Requests carry only fields that exist there; the
unit tests pin the field lists below against that release.

A /generate answer must carry one log-prob per output token (`meta_info.output_token_logprobs` is
``[[logprob, token_id, text_or_null], ...]``, aligned with ``output_ids``): anything else is a
:class:`MalformedResponse` naming the engine, never silently patched up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

SGLANG_VERSION = "0.5.23"

# Top-level /generate fields we send (all exist in GenerateReqInput of 0.5.23).
GENERATE_FIELDS = ("input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                   "top_logprobs_num", "rid", "stream")
# sampling_params keys we send (all exist in SamplingParams of 0.5.23).
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop",
                   "stop_token_ids", "ignore_eos", "no_stop_trim", "skip_special_tokens", "n",
                   "sampling_seed", "min_new_tokens")
FINISH_TYPES = ("stop", "length", "abort")


class EngineError(RuntimeError):
    """Any failure of one engine; ``engine`` is its URL."""

    def __init__(self, engine: str, message: str):
        super().__init__(f"engine {engine}: {message}")
        self.engine = engine


class EngineUnavailable(EngineError):
    """The engine could not be reached (refused, reset, timed out) after the retries."""


class EngineHTTPError(EngineError):
    """The engine answered with a non-retryable HTTP error (e.g. 400 for a bad request)."""

    def __init__(self, engine: str, status: int, body: str):
        super().__init__(engine, f"HTTP {status}: {body[:500]}")
        self.status = status


class MalformedResponse(EngineError):
    """The engine answered 200 with something that violates the protocol."""


@dataclass
class GenerateOutput:
    """One finished generation, validated."""

    engine: str
    """URL of the engine that produced it."""
    output_ids: List[int]
    """Generated token ids (including a matched stop/EOS token, as SGLang returns them)."""
    logprobs: Optional[List[float]]
    """Log-prob of each output token under log_softmax(logits / T); None if not requested."""
    finish_reason: str
    """'stop', 'length' or 'abort'."""
    finish_detail: Dict[str, Any] = field(default_factory=dict)
    """The raw finish_reason object (e.g. the matched stop token or string)."""
    weight_version: Optional[str] = None
    """`meta_info.weight_version`: the weights that produced the response."""
    prompt_tokens: int = 0
    """Prompt length the engine saw."""
    text: Optional[str] = None
    """Decoded text (absent with --skip-tokenizer-init)."""
    rid: Optional[str] = None
    """Request id (`meta_info.id`)."""
    cached_tokens: int = 0
    """`meta_info.cached_tokens`: prompt tokens whose KV the engine's prefix (radix) cache supplied."""


def sampling_params(
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    no_stop_trim: bool = False,
    sampling_seed: Optional[int] = None,
) -> Dict[str, Any]:
    """A `sampling_params` object with SGLang's field names (n = 1: we fan out ourselves)."""
    params: Dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": int(top_k),
        "n": 1,
    }
    if stop:
        params["stop"] = list(stop)
    if stop_token_ids:
        params["stop_token_ids"] = [int(t) for t in stop_token_ids]
    if ignore_eos:
        params["ignore_eos"] = True
    if no_stop_trim:
        params["no_stop_trim"] = True
    if sampling_seed is not None:
        params["sampling_seed"] = int(sampling_seed)
    return params


def generate_payload(input_ids: Sequence[int], params: Dict[str, Any], *, rid: Optional[str] = None,
                     return_logprob: bool = True, logprob_start_len: int = -1) -> Dict[str, Any]:
    """The JSON body of one non-streaming /generate request."""
    unknown = set(params) - set(SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"sampling_params keys {sorted(unknown)} are not sent to SGLang {SGLANG_VERSION}")
    body: Dict[str, Any] = {
        "input_ids": [int(t) for t in input_ids],
        "sampling_params": params,
        "return_logprob": bool(return_logprob),
        "logprob_start_len": int(logprob_start_len),
        "top_logprobs_num": 0,
        "stream": False,
    }
    if rid is not None:
        body["rid"] = rid
    return body


def generate_batch_payload(input_ids: Sequence[Sequence[int]], params: Sequence[Dict[str, Any]],
                           rids: Sequence[str], *, return_logprob: bool = True) -> Dict[str, Any]:
    """The JSON body of one non-streaming batch /generate request (SGLang's GenerateReqInput with
    lists: item i is ``input_ids[i]`` with ``sampling_params[i]`` and ``rid[i]``; the engine serves
    each item as its own request and answers a list in the same order)."""
    if not (len(input_ids) == len(params) == len(rids)) or not input_ids:
        raise ValueError(f"a batch needs as many prompts ({len(input_ids)}), sampling_params ({len(params)}) "
                         f"and rids ({len(rids)}), at least one")
    items = [generate_payload(ids, p, rid=r, return_logprob=return_logprob)
             for ids, p, r in zip(input_ids, params, rids, strict=True)]
    body = dict(items[0])
    body.update(input_ids=[b["input_ids"] for b in items], sampling_params=[b["sampling_params"] for b in items],
                rid=[b["rid"] for b in items])
    return body


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_generate(obj: Any, engine: str, *, expect_logprobs: bool = True) -> GenerateOutput:
    """Validate one /generate answer object and turn it into a :class:`GenerateOutput`."""

    def bad(msg: str) -> MalformedResponse:
        return MalformedResponse(engine, f"malformed /generate response: {msg}")

    if not isinstance(obj, dict):
        raise bad(f"expected an object, got {type(obj).__name__}")
    ids = obj.get("output_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad("'output_ids' missing or not a list of ints")
    meta = obj.get("meta_info")
    if not isinstance(meta, dict):
        raise bad("'meta_info' missing")
    fr = meta.get("finish_reason")
    if isinstance(fr, str):  # tolerate the bare-string form some proxies emit
        fr = {"type": fr}
    if not isinstance(fr, dict) or fr.get("type") not in FINISH_TYPES:
        raise bad(f"finish_reason {meta.get('finish_reason')!r} is not one of {FINISH_TYPES}")
    logprobs: Optional[List[float]] = None
    if expect_logprobs:
        entries = meta.get("output_token_logprobs")
        if not isinstance(entries, list):
            raise bad("meta_info.output_token_logprobs missing (was return_logprob honoured?)")
        if len(entries) != len(ids):
            raise bad(f"{len(entries)} log-probs for {len(ids)} output tokens")
        logprobs = []
        for i, (entry, tok) in enumerate(zip(entries, ids, strict=True)):
            if not isinstance(entry, (list, tuple)) or len(entry) < 2:
                raise bad(f"output_token_logprobs[{i}] = {entry!r} is not [logprob, token_id, ...]")
            lp, tid = entry[0], entry[1]
            if tid != tok:
                raise bad(f"output_token_logprobs[{i}] is for token {tid}, output_ids[{i}] = {tok}")
            if not _finite(lp) or lp > 1e-4:
                raise bad(f"output_token_logprobs[{i}] = {lp!r} is not a finite log-probability")
            logprobs.append(float(min(lp, 0.0)))
    version = meta.get("weight_version")
    return GenerateOutput(
        engine=engine,
        output_ids=list(ids),
        logprobs=logprobs,
        finish_reason=fr["type"],
        finish_detail=dict(fr),
        weight_version=None if version is None else str(version),
        prompt_tokens=int(meta.get("prompt_tokens") or 0),
        text=obj.get("text"),
        rid=meta.get("id"),
        cached_tokens=int(meta.get("cached_tokens") or 0),
    )


def update_weights_from_disk_payload(model_path: str, *, weight_version: Optional[str] = None,
                                     flush_cache: bool = True, abort_all_requests: bool = False,
                                     load_format: Optional[str] = None) -> Dict[str, Any]:
    """Body of POST /update_weights_from_disk (UpdateWeightFromDiskReqInput)."""
    body: Dict[str, Any] = {"model_path": model_path, "flush_cache": flush_cache,
                            "abort_all_requests": abort_all_requests}
    if weight_version is not None:
        body["weight_version"] = str(weight_version)
    if load_format is not None:
        body["load_format"] = load_format
    return body


def parse_input_logprobs(obj: Any, engine: str, expected: int) -> List[float]:
    """``meta_info.input_token_logprobs`` of a scoring request: ``expected`` finite log-probs."""
    if isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]
    entries = (obj.get("meta_info") or {}).get("input_token_logprobs") if isinstance(obj, dict) else None
    if not isinstance(entries, list) or len(entries) != expected:
        raise MalformedResponse(engine, f"expected {expected} input_token_logprobs, got "
                                        f"{len(entries) if isinstance(entries, list) else entries!r}")
    out = []
    for i, entry in enumerate(entries):
        lp = entry[0] if isinstance(entry, (list, tuple)) and entry else None
        if not _finite(lp) or lp > 1e-4:
            raise MalformedResponse(engine, f"input_token_logprobs[{i}] = {entry!r} is not a log-probability")
        out.append(float(min(lp, 0.0)))
    return out


# -- weight updates besides /update_weights_from_disk (io_struct.py of 0.5.23) ---------------------
# Distributed and tensor updates must run inside a session: /begin_weight_update, then any number of
# updates, then /end_weight_update (``WeightUpdater._session`` in 0.5.23).

def init_weights_update_group_payload(master_address: str, master_port: int, rank_offset: int,
                                      world_size: int, group_name: str, backend: str) -> Dict[str, Any]:
    """Body of POST /init_weights_update_group (InitWeightsUpdateGroupReqInput)."""
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def update_weights_from_distributed_payload(names: Sequence[str], dtypes: Sequence[str],
                                            shapes: Sequence[Sequence[int]], group_name: str, *,
                                            flush_cache: bool = False, weight_version: Optional[str] = None,
                                            load_format: Optional[str] = "flattened_bucket") -> Dict[str, Any]:
    """Body of POST /update_weights_from_distributed (UpdateWeightsFromDistributedReqInput).

    ``dtypes`` are torch attribute names ("bfloat16"): SGLang does ``getattr(torch, dtype)``.
    """
    body: Dict[str, Any] = {"names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
                            "group_name": group_name, "flush_cache": flush_cache, "load_format": load_format}
    if weight_version is not None:
        body["weight_version"] = str(weight_version)
    return body


def update_weights_from_tensor_payload(serialized_named_tensors: Sequence[str], *,
                                       load_format: Optional[str] = None, flush_cache: bool = False,
                                       weight_version: Optional[str] = None) -> Dict[str, Any]:
    """Body of POST /update_weights_from_tensor: one base64 string per engine TP rank."""
    body: Dict[str, Any] = {"serialized_named_tensors": list(serialized_named_tensors),
                            "load_format": load_format, "flush_cache": flush_cache}
    if weight_version is not None:
        body["weight_version"] = str(weight_version)
    return body
