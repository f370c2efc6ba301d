"""SGLang 0.5.23's request checks, for the local engine: the JSON schema gate and SamplingParams.verify.

Two checks run before a request reaches the batch, each answered as SGLang answers it:

1. The schema gate (``http_server.generate_request`` -> ``api_contract.generate_contract_error``):
   the body is decoded against the generated schema types; a violation is HTTP 400 with
   ``{"error": "<serde-style text>"}``, e.g. ``unknown field `max_tokens`, expected one of ...`` or
   ``invalid type: string "4", expected i64``. The types come from
   ``rollout/engines/sglang_contract.json`` (extracted from the wheel by
   ``tools/sglang_contract.py``); :func:`contract_error` interprets them.
2. ``SamplingParams.__post_init__`` + ``verify()`` (``srt/sampling/sampling_params.py``), raised as
   ``ValueError`` in the tokenizer manager and answered 400 with ``{"error": {"message": ...}}``:
   :func:`normalize_sampling` applies the same defaults and checks with the same messages.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional

CONTRACT_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "sglang_contract.json")
with open(CONTRACT_PATH) as _f:
    CONTRACT = json.load(_f)
GATE = CONTRACT["json_gate"]
SAMPLING_EPS = 1e-6  # sampling_params._SAMPLING_EPS: below it a temperature means greedy
TOP_K_ALL = 1 << 30


class ContractError(ValueError):
    """The body violates the schema (SGLang answers 400 {"error": str(e)})."""


def _unexpected(v: Any) -> str:
    """serde's description of a JSON value, the text SGLang's gate reports."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v}"'
    return "sequence" if isinstance(v, list) else "map" if isinstance(v, dict) else type(v).__name__


def _bad(v: Any, expected: Optional[str]) -> ContractError:
    return ContractError(f"invalid type: {_unexpected(v)}, expected {expected}")


def _unknown(key: str, fields) -> ContractError:
    names = list(fields)
    if len(names) == 1:
        return ContractError(f"unknown field `{key}`, expected `{names[0]}`")
    if len(names) == 2:
        return ContractError(f"unknown field `{key}`, expected `{names[0]}` or `{names[1]}`")
    listed = ", ".join(f"`{f}`" for f in names)
    return ContractError(f"unknown field `{key}`, expected one of {listed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check(v: Any, t: Any) -> None:
    """Raise :class:`ContractError` if ``v`` does not have type expression ``t``."""
    if t == "any":
        return
    (kind, arg), = [(k, t[k]) for k in t if k in ("int", "uint", "float", "bool", "str", "ref", "list", "map",
                                                  "opaque", "never")]
    if kind == "int" and not _is_int(v) or kind == "bool" and not isinstance(v, bool) or \
            kind == "str" and not isinstance(v, str) or \
            kind == "float" and not (_is_int(v) or isinstance(v, float)) or kind == "never":
        raise _bad(v, arg)
    if kind == "uint":
        if not _is_int(v):
            raise _bad(v, arg)
        if v < 0:
            raise ContractError(f"invalid value: integer `{v}`, expected {arg}")
    elif kind == "ref":
        if "expected_map" in t and not isinstance(v, dict):
            raise _bad(v, t["expected_map"])
        check_named(v, arg)
    elif kind == "list":
        if not isinstance(v, list):
            raise _bad(v, t.get("expected"))
        for e in v:
            check(e, arg)
    elif kind == "map":
        if not isinstance(v, dict):
            raise _bad(v, t.get("expected"))
        for e in v.values():
            check(e, arg)


def check_named(v: Any, name: str) -> None:
    d = GATE[name]
    kind = d["kind"]
    if kind == "struct":
        if not isinstance(v, dict):
            raise _bad(v, d["expected"])
        for key, x in v.items():
            f = d["fields"].get(key)
            if f is None:
                if d["unknown_keys"] == "reject":
                    raise _unknown(key, d["field_order"])
                continue
            if x is None and f["null"] != "error":
                continue
            check(x, f["type"])
    elif kind == "optional":
        if v is not None:
            check(v, d["type"])
    elif kind == "alias":
        check(v, d["type"])
    elif kind == "value_or_list":
        if not isinstance(v, list):
            check(v, d["scalar"])
            return
        spec = d["list"]
        if "list" in spec:
            check(v, spec["list"])
            return
        first = v[0] if v else None
        flat = not v or (_is_int(first) or isinstance(first, float) if spec["flat_if_first"] == "number"
                         else isinstance(first, str))
        check(v, spec["flat"] if flat else spec["batch"])
    # "opaque": decoders the extractor could not express (media, finish reasons) are not checked here


def contract_error(body: Any) -> Optional[str]:
    """The schema violation in a parsed ``/generate`` body, or None (SGLang's generate_contract_error)."""
    try:
        check_named(body, "GenerateRequest")
    except ContractError as e:
        return str(e)
    return None


def normalize_sampling(sp: Dict[str, Any], vocab_size: int) -> Dict[str, Any]:
    """SamplingParams.__post_init__ defaults, then verify(): the normalized dict, or ValueError with
    SGLang's message."""
    d = {"max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
         "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0,
         "n": 1, "ignore_eos": False, "skip_special_tokens": True, "spaces_between_special_tokens": True,
         "no_stop_trim": False}
    out = dict(sp)
    for k, default in d.items():
        if out.get(k) is None and not (k == "max_new_tokens" and k in out):
            out[k] = default
    for k in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
        out[k] = float(out[k])  # msgspec decodes a JSON integer into these float fields
    out["stop_token_ids"] = sorted({int(t) for t in (out.get("stop_token_ids") or []) if t is not None}) or None
    if 0 <= out["temperature"] < SAMPLING_EPS:  # greedy
        out["temperature"], out["top_k"] = 1.0, 1
    if out["top_k"] == -1:
        out["top_k"] = TOP_K_ALL
    _verify(out, vocab_size)
    return out


def _verify(p: Dict[str, Any], vocab_size: int) -> None:
    """The checks of SamplingParams.verify (0.5.23), in its order and with its messages."""
    bw = p.get("beam_width")
    if bw is not None and bw < 1:
        raise ValueError(f"beam_width must be at least 1, got {bw}.")
    t = p["temperature"]
    if not math.isfinite(t) or t < 0.0:
        raise ValueError(f"temperature must be a non-negative finite number, got {t}.")
    if not 0.0 < p["top_p"] <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p['top_p']}.")
    if not 0.0 <= p["min_p"] <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {p['min_p']}.")
    if p["top_k"] < 1 or p["top_k"] == -1:
        raise ValueError(f"top_k must be -1 (disable) or at least 1, got {p['top_k']}.")
    for k in ("frequency_penalty", "presence_penalty"):
        if not -2.0 <= p[k] <= 2.0:
            raise ValueError(f"{k} must be in [-2, 2], got {p[k]}.")
    if not 0.0 < p["repetition_penalty"] <= 2.0:
        raise ValueError(f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {p['repetition_penalty']}.")
    _verify_lengths_and_extras(p, vocab_size)


def _verify_lengths_and_extras(p: Dict[str, Any], vocab_size: int) -> None:
    """SamplingParams.verify continued: token budgets, logit_bias, seed, one grammar at most."""
    if not 0 <= p["min_new_tokens"]:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {p['min_new_tokens']}.")
    m = p["max_new_tokens"]
    if m is not None:
        if m < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {m}.")
        if not p["min_new_tokens"] <= m:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens({m})], got {p['min_new_tokens']}.")
    for token_id in p.get("logit_bias") or {}:
        if not 0 <= int(token_id) < vocab_size:
            raise ValueError(f"logit_bias must has keys in [0, {vocab_size - 1}], got {token_id}.")
    seed = p.get("sampling_seed")
    if seed is not None and not -(2 ** 63) <= seed <= 2 ** 63 - 1:
        raise ValueError(f"sampling_seed must be in [-2**63, 2**63 - 1], got {seed}.")
    if sum(p.get(g) is not None for g in ("json_schema", "regex", "ebnf", "structural_tag")) > 1:
        raise ValueError("Only one of json_schema, regex, ebnf, or structural_tag can be set.")
