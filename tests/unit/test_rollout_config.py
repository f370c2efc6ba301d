"""The `rollout` config section: defaults validate, bad values are refused naming the field."""

import ast
import dataclasses
import inspect

import pytest

from rollout import config as rc
from rollout.config import MultiTurnConfig, RolloutConfig, SandboxConfig, SGLangConfig


def _validate_tree(obj):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value)
    obj.validate() if hasattr(obj, "validate") else None


def test_defaults_validate():
    _validate_tree(RolloutConfig())


@pytest.mark.parametrize("kwargs, field", [
    ({"n_samples": 0}, "rollout.n_samples"),
    ({"top_p": 0.0}, "rollout.top_p"),
    ({"top_k": 0}, "rollout.top_k"),
    ({"temperature": 0.0}, "rollout.temperature"),
    ({"host": "0.0.0.0"}, "rollout.api_key"),
    ({"urls": ["localhost:3000"]}, "rollout.urls"),
    ({"max_new_tokens": 0}, "rollout.max_new_tokens"),
    ({"engine": "sglang", "api_key": "k", "sglang": SGLangConfig(router=True)}, "rollout.sglang.router"),
    ({"engine": "sglang", "multi_turn": MultiTurnConfig(enabled=True),
      "sglang": SGLangConfig(skip_tokenizer_init=True)},
     "rollout.multi_turn"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        _validate_tree(RolloutConfig(**kwargs))


@pytest.mark.parametrize("section, kwargs, field", [
    (SandboxConfig, {"timeout_s": 0}, "rollout.sandbox.timeout_s"),
    (MultiTurnConfig, {"max_turns": 0}, "rollout.multi_turn.max_turns"),
    (SGLangConfig, {"tp_size": 0}, "rollout.sglang.tp_size"),
    (SGLangConfig, {"mem_fraction_static": 1.5}, "rollout.sglang.mem_fraction_static"),
])
def test_nested_sections_validate(section, kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        section(**kwargs).validate()


def test_every_field_has_a_docstring():
    tree = ast.parse(inspect.getsource(rc))
    missing = []
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    missing.append(f"{cls.name}.{node.target.id}")
    assert not missing, f"fields without a docstring: {missing}"


def test_rollout_never_imports_megatron_alp():
    import pathlib

    root = pathlib.Path(rc.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] == "megatron_alp"]
    assert not offenders, f"rollout/ must not import megatron_alp: {offenders}"
