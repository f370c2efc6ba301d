"""Reward functions: built-ins by name, user functions by dotted path.

A reward function has the signature (plain or ``async``)::

    def my_reward(prompt: str, response: str, label, metadata: dict) -> float

``prompt`` and ``response`` are decoded text (special tokens removed; a multi-turn response
includes the tool observations), ``label`` is the dataset's ground truth (``rollout.data.label_key``)
and ``metadata`` holds the rest of the dataset record plus ``finish_reason``, ``num_turns`` and
``tool_statuses``. Select it with ``rollout.reward: package.module:my_reward`` (or
``package.module.my_reward``).
"""

from __future__ import annotations

import importlib
from typing import Any, Awaitable, Callable, Dict, Union

from .math import math_reward
from .synthetic import synthetic_reward

RewardFn = Callable[[str, str, Any, Dict[str, Any]], Union[float, Awaitable[float]]]

BUILTIN: Dict[str, RewardFn] = {"math": math_reward, "synthetic": synthetic_reward}
INLINE = ("synthetic",)
"""Built-ins cheap and safe enough to score on the event loop (no worker process)."""


def load_reward_fn(name: str) -> RewardFn:
    """A built-in (``math``, ``synthetic``) or ``module:function`` / ``module.function``."""
    if name in BUILTIN:
        return BUILTIN[name]
    module, sep, attr = name.partition(":")
    if not sep:
        module, _, attr = name.rpartition(".")
    if not module or not attr:
        raise ValueError(f"rollout.reward = {name!r}: expected 'math', 'synthetic' or 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rollout.reward = {name!r} cannot be loaded: {e}") from e
    if not callable(fn):
        raise ValueError(f"rollout.reward = {name!r} is not callable")
    return fn
