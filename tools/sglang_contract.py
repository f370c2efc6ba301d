"""Extract SGLang's HTTP contract from a wheel, by AST, without importing sglang.

    python -m pip download sglang==0.5.23 --no-deps -d /tmp/sglang_whl
    PYTHONPATH=$PWD .venv/bin/python tools/sglang_contract.py /tmp/sglang_whl/sglang-0.5.23-*.whl \
        > rollout/engines/sglang_contract.json

What is extracted (the committed JSON is the repository's one source for these facts; a bump of
SGLang is one regeneration and a diff):
- ``json_gate``: the decoders of ``sglang/api/v1/api_types.py`` (the schema gate that
  ``http_server.generate_request`` runs on every ``/generate`` body and answers 400 with), as type
  expressions: structs (fields, nullability, unknown keys rejected or ignored), lists, maps,
  "value or list" unions and optionals. ``rollout.engines.local.gate`` interprets them.
- ``io_struct``: the fields of the request dataclasses of ``srt/managers/io_struct.py``.
- ``sampling_params``: the fields of ``srt/sampling/sampling_params.py``'s SamplingParams and the
  checks of its ``verify()`` (condition and message, as source text).
- ``routes``: every route of ``srt/entrypoints/http_server.py`` with its methods.
- ``responses``: the keys of ``/generate``'s meta_info (tokenizer_manager.py) and ``/model_info``.
"""

from __future__ import annotations

import ast
import json
import sys
import zipfile
from typing import Any, Dict, List, Optional

IO_STRUCTS = ("BaseReq", "GenerateReqInput", "UpdateWeightFromDiskReqInput", "UpdateWeightsFromDistributedReqInput",
              "UpdateWeightsFromTensorReqInput", "InitWeightsUpdateGroupReqInput",
              "DestroyWeightsUpdateGroupReqInput", "UpdateWeightVersionReqInput", "GetWeightsByNameReqInput",
              "PauseGenerationReqInput", "ContinueGenerationReqInput", "AbortReq", "FlushCacheReqInput")
EXPECT = {"_expect_int": "int", "_expect_uint": "uint", "_expect_float": "float", "_expect_bool": "bool",
          "_expect_str": "str"}


def _kw(call: ast.Call, name: str) -> Optional[str]:
    for k in call.keywords:
        if k.arg == name and isinstance(k.value, ast.Constant):
            return k.value.value
    return None


def type_expr(node: ast.AST, var: str) -> Any:
    """The type a decoder expression checks for the JSON value named ``var``."""
    if isinstance(node, ast.Name) and node.id == var:
        return "any"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        fn = node.func.id
        if fn in EXPECT:
            return {EXPECT[fn]: _kw(node, "expected")}
        if fn.startswith("decode_") and node.args:
            inner = node.args[0]
            out: Dict[str, Any] = {"ref": fn[len("decode_"):]}
            if isinstance(inner, ast.Call) and getattr(inner.func, "id", "") == "_expect_map":
                out["expected_map"] = _kw(inner, "expected")
            return out
    if isinstance(node, ast.ListComp):
        seq = node.generators[0].iter
        return {"list": type_expr(node.elt, node.generators[0].target.id), "expected": _kw(seq, "expected")}
    if isinstance(node, ast.DictComp):
        it = node.generators[0].iter.func.value  # _expect_map(x, ...).items()
        return {"map": type_expr(node.value, node.generators[0].target.elts[1].id), "expected": _kw(it, "expected")}
    return {"opaque": ast.unparse(node)}


def _field(value: ast.AST, var: str) -> Dict[str, Any]:
    if isinstance(value, ast.IfExp) and ast.unparse(value.test) == f"{var} is None":
        return {"type": type_expr(value.orelse, var), "null": ast.literal_eval(value.body)}
    t = type_expr(value, var)
    return {"type": t, "null": None if t == "any" else "error"}


def _struct(fn: ast.FunctionDef) -> Optional[Dict[str, Any]]:
    loop = next((s for s in fn.body if isinstance(s, ast.For)), None)
    head = fn.body[0]
    if loop is None or not (isinstance(head, ast.Assign) and "_expect_map" in ast.unparse(head.value)):
        return None
    fields: Dict[str, Any] = {}
    node, reject = loop.body[0], False
    while isinstance(node, ast.If):
        key = node.test.comparators[0].value
        fields[key] = _field(node.body[0].value, "x")
        if len(node.orelse) == 1 and isinstance(node.orelse[0], ast.If):
            node = node.orelse[0]
        else:
            reject = bool(node.orelse) and isinstance(node.orelse[0], ast.Raise)
            break
    return {"kind": "struct", "expected": _kw(head.value, "expected"), "fields": fields,
            "field_order": list(fields),  # serde lists the expected fields in this order
            "unknown_keys": "reject" if reject else "ignore"}


def _alias(fn: ast.FunctionDef) -> Dict[str, Any]:
    body = fn.body
    if len(body) == 1 and isinstance(body[0], ast.Return):
        v = body[0].value
        if isinstance(v, ast.IfExp) and ast.unparse(v.test) == "value is None":
            return {"kind": "optional", "type": type_expr(v.orelse, "value")}
        return {"kind": "alias", "type": type_expr(v, "value")}
    if len(body) == 2 and isinstance(body[0], ast.If) and "isinstance(value, list)" in ast.unparse(body[0].test):
        inner = body[0].body
        if isinstance(inner[0], ast.If):  # [] and [scalar, ...] are one flat list; else a batch
            pred = ast.unparse(inner[0].test)
            flat = "number" if "_is_number" in pred else "str" if "str" in pred else pred
            as_list = {"flat_if_first": flat, "flat": type_expr(inner[0].body[0].value, "value"),
                       "batch": type_expr(inner[1].value, "value")}
        else:
            as_list = {"list": type_expr(inner[0].value, "value")}
        tail = body[1]
        scalar = (type_expr(tail.value, "value") if isinstance(tail, ast.Return)
                  else {"never": _kw(tail.exc, "expected")})
        return {"kind": "value_or_list", "list": as_list, "scalar": scalar}
    return {"kind": "opaque"}


def json_gate(src: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("decode_"):
            name = node.name[len("decode_"):]
            out[name] = _struct(node) or _alias(node)
    return out


def dataclass_fields(src: str, names) -> Dict[str, List[str]]:
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.ClassDef) and node.name in names:
            out[node.name] = [s.target.id for s in node.body
                              if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    return out


def sampling_params(src: str) -> Dict[str, Any]:
    tree = ast.parse(src)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SamplingParams")
    fields = []
    for s in cls.body:
        if isinstance(s, ast.AnnAssign):
            fields.append({"name": s.target.id, "default": ast.unparse(s.value) if s.value else None})
    verify = next(s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name == "verify")
    checks = []
    for node in ast.walk(verify):
        if isinstance(node, ast.If) and node.body and isinstance(node.body[0], ast.Raise):
            msg = node.body[0].exc.args[0] if node.body[0].exc.args else None
            checks.append({"if": ast.unparse(node.test), "raise": ast.unparse(msg) if msg is not None else None})
    return {"fields": fields, "verify": checks}


def routes(src: str) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for d in node.decorator_list:
            if not (isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
                    and ast.unparse(d.func.value) == "app" and d.args and isinstance(d.args[0], ast.Constant)):
                continue
            kind = d.func.attr
            if kind == "api_route":
                methods = next((ast.literal_eval(k.value) for k in d.keywords if k.arg == "methods"), ["GET"])
            elif kind in ("get", "post", "put", "delete"):
                methods = [kind.upper()]
            else:
                continue
            out.setdefault(d.args[0].value, [])
            out[d.args[0].value] = sorted(set(out[d.args[0].value]) | set(methods))
    return dict(sorted(out.items()))


def dict_keys_in(fn_src: str, var: str) -> List[str]:
    """Keys a function puts into the dict ``var`` (literal, subscript assignment, .update literal)."""
    keys: List[str] = []
    for node in ast.walk(ast.parse(fn_src)):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and \
                any(isinstance(t, ast.Name) and t.id == var for t in node.targets):
            keys += [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript) and \
                ast.unparse(node.targets[0].value) == var and isinstance(node.targets[0].slice, ast.Constant):
            keys.append(node.targets[0].slice.value)
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == f"{var}.update" and \
                node.args and isinstance(node.args[0], ast.Dict):
            keys += [k.value for k in node.args[0].keys if isinstance(k, ast.Constant)]
    return sorted(set(keys))


def response_bodies(fn_src: str) -> List[List[str]]:
    """The keys of each dict literal a function answers with (``ORJSONResponse({...})``)."""
    out = []
    for node in ast.walk(ast.parse(fn_src)):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("Response") and \
                node.args and isinstance(node.args[0], ast.Dict):
            out.append(sorted(k.value for k in node.args[0].keys if isinstance(k, ast.Constant)))
    return out


def function_src(src: str, name: str) -> str:
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return ast.unparse(node)
    raise KeyError(name)


def extract(wheel: str) -> Dict[str, Any]:
    with zipfile.ZipFile(wheel) as z:
        read = lambda p: z.read(f"sglang/{p}").decode()  # noqa: E731
        version = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        version = next(line.split(":", 1)[1].strip() for line in z.read(version).decode().splitlines()
                       if line.startswith("Version:"))
        http = read("srt/entrypoints/http_server.py")
        tm = read("srt/managers/tokenizer_manager.py")
        return {
            "sglang_version": version,
            "source": "extracted by tools/sglang_contract.py from the sglang wheel (AST, no import)",
            "json_gate": json_gate(read("api/v1/api_types.py")),
            "io_struct": dataclass_fields(read("srt/managers/io_struct.py"), IO_STRUCTS),
            "sampling_params": sampling_params(read("srt/sampling/sampling_params.py")),
            "routes": routes(http),
            "responses": {
                "generate_meta_info": dict_keys_in(function_src(tm, "_handle_batch_output"), "meta_info"),
                "model_info": dict_keys_in(function_src(http, "model_info"), "result"),
                "update_weight_version": response_bodies(function_src(http, "update_weight_version")),
            },
        }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tools/sglang_contract.py path/to/sglang-X.whl > rollout/engines/sglang_contract.json")
    print(json.dumps(extract(sys.argv[1]), indent=1, sort_keys=True))
