"""Megatron-Core's ``jit_fuser`` as a no-op where CUDA is absent, decided as Megatron loads.

``megatron/core/jit.py`` sets ``jit_fuser = torch.compile`` when it is imported, and a dozen
Megatron modules (``fusions.fused_bias_geglu``, ``fused_bias_swiglu``, ``transformer.attention``,
...) decorate functions with it at *their* import. ``torch.compile(fn)`` imports torch._dynamo and
torch._inductor: 2.4 s of the 4.1 s it takes to import Megatron-Core on the 2-core CPU machine,
paid by every process that imports Megatron (trainer ranks, tools, test worlds). The CPU path
never calls a fused function (the CPU model uses no bias-activation, bias-dropout or rope fusion:
``tests/unit/test_jit_fuser.py`` checks it), so there the decorated functions lose nothing.

Megatron imports ``megatron.core.jit`` while executing ``megatron/core/__init__.py``, before any
code of ours could call ``disable_jit_fuser()``; :func:`install` therefore puts a finder on
``sys.meta_path`` (it answers for that one module name only) that lets the module execute and then,
if CUDA is unavailable, calls Megatron's own ``disable_jit_fuser()`` (``jit_fuser = noop_decorator``)
before any decorating module reads the name.
With CUDA nothing changes. ``megatron_alp/__init__.py`` installs it: every entry point passes there.
``MEGATRON_ALP_JIT_FUSER=1`` keeps Megatron's choice on a CPU too.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

_TARGET = "megatron.core.jit"


def _after_exec(module) -> None:
    if os.environ.get("MEGATRON_ALP_JIT_FUSER") == "1":
        return
    import torch  # already imported: megatron.core.jit imports it

    if not torch.cuda.is_available():
        module.disable_jit_fuser()


class _JitFuserFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders for ``megatron.core.jit``'s spec and wraps its
    loader's ``exec_module`` so that :func:`_after_exec` runs right after the module's body."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module):  # an attribute of this one loader instance (one per module file)
            original(module)
            _after_exec(module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Idempotent. If Megatron's jit module was imported already (by code that ran before
    megatron_alp), apply the same decision to it: modules decorated since keep torch.compile."""
    if _TARGET in sys.modules:
        _after_exec(sys.modules[_TARGET])
        return
    if not any(isinstance(f, _JitFuserFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _JitFuserFinder())
