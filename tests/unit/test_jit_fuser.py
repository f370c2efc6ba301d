"""Megatron's jit_fuser is a no-op without CUDA (megatron_alp/runtime/jit_fuser.py): torch._dynamo is
never imported, and the CPU model never calls a function Megatron decorates with it, so making them
plain functions changes no number."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

from megatron_alp.runtime import jit_fuser

# A fresh interpreter (Megatron not imported yet): every jit_fuser-decorated function is wrapped to
# record its calls (around the decorator the hook chose), then Qwen2- and Qwen3-shaped models with ALP
# run a perturbed forward and a backward, with activation recomputation on the Qwen3 one.
_SCRIPT = textwrap.dedent("""
    import functools, json, sys
    import torch
    from megatron_alp.runtime import jit_fuser as hook

    decorated, called, chosen = [], [], []
    _original = hook._after_exec

    def _after_exec(module):
        _original(module)
        chosen.append(module.jit_fuser is module.noop_decorator)
        inner = module.jit_fuser

        def record(fn):
            decorated.append(fn.__qualname__)
            f = inner(fn)

            @functools.wraps(fn)
            def wrapper(*a, **k):
                called.append(fn.__qualname__)
                return f(*a, **k)
            return wrapper
        module.jit_fuser = record

    hook._after_exec = _after_exec

    import megatron_alp.trainer.loop  # noqa: F401 - everything a trainer rank imports
    from megatron_alp.model.alp import alp_forward
    from megatron_alp.runtime.distributed import init_distributed
    from tests.distributed.layouts import batch, build, ce_loss, make_cfg, positions

    def alp_spec(cfg, config):
        from megatron_alp.model.alp import alp_block_spec
        return alp_block_spec(cfg.model, cfg.alp, config)

    init_distributed()
    qwen3 = ["model.family=qwen3", "model.qkv_bias=false", "model.qk_layernorm=true", "model.head_dim=32"]
    for extra, parallel in (([], {}), (qwen3, {"recompute": "full", "recompute_num_layers": 2})):
        cfg = make_cfg(extra=["alp.enabled=true", "alp.sigma_init=0.1", *extra])
        model = build(cfg, block_spec=alp_spec, **parallel)
        tokens, labels = batch()
        with alp_forward(step=0, micro_batch=0):
            loss = ce_loss(model(tokens, positions(tokens), None), labels)
        loss.backward()
        assert torch.isfinite(loss)
    print(json.dumps({"decorated": decorated, "called": called, "chosen_noop": chosen,
                      "dynamo": sorted(m for m in sys.modules if m.startswith(("torch._dynamo", "torch._inductor")))}))
""")


def test_cpu_processes_never_import_dynamo_nor_call_a_fused_function():
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    env.pop("MEGATRON_ALP_JIT_FUSER", None)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["chosen_noop"] == [True]  # the hook ran once, as megatron.core.jit loaded, and disabled it
    # The hook saw Megatron's decorations (the fusions and attention's output gate at least) ...
    assert {"bias_swiglu", "bias_dropout_add_fused_train", "Attention._apply_output_gate"} <= set(out["decorated"])
    # ... none of which the CPU model calls (config/megatron.py turns every fusion off).
    assert out["called"] == []
    assert out["dynamo"] == []


def test_hook_keeps_megatron_choice_with_cuda_or_when_asked(monkeypatch):
    import torch

    def fake_jit_module():
        m = types.SimpleNamespace(jit_fuser="torch.compile")
        m.disable_jit_fuser = lambda: setattr(m, "jit_fuser", "noop")
        return m

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    m = fake_jit_module()
    jit_fuser._after_exec(m)
    assert m.jit_fuser == "torch.compile"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MEGATRON_ALP_JIT_FUSER", "1")
    m = fake_jit_module()
    jit_fuser._after_exec(m)
    assert m.jit_fuser == "torch.compile"

    monkeypatch.delenv("MEGATRON_ALP_JIT_FUSER")
    m = fake_jit_module()
    jit_fuser._after_exec(m)
    assert m.jit_fuser == "noop"
