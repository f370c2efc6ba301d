"""``rollout/`` metrics of tool use and reward scoring, from the samples of one rollout.

Each sample carries what it did (:mod:`rollout.tir` fills ``num_turns``, ``loss_mask`` and
``metadata["tool_statuses"]``; the reward pool sets ``metadata["reward_status"]``); the trainer's
driver adds these to its step metrics. Definitions (means are over the samples of the rollout):

- ``rollout/turns_mean``: model turns per sample (1 = answered without the tool);
- ``rollout/tool_calls_mean``: code executions per sample; ``rollout/tool_use_frac``: fraction of
  samples with at least one;
- ``rollout/tool_status_<s>``: executions that ended with status ``s`` (ok / error / timeout /
  memory / setup: :class:`rollout.sandbox.ToolResult`), counted over the rollout;
- ``rollout/obs_tokens_mean``: observation (tool output) tokens per sample, the loss-masked ones;
- ``rollout/final_answer_frac``: fraction of samples whose response holds a ``\\boxed{...}``
  answer (:func:`rollout.rewards.math.extract_boxed`, the answer the math reward reads);
- ``rollout/reward_timeouts``: samples whose reward call ran past ``rollout.reward_timeout_s``,
  scored 0 (count over the rollout; a reward that raised counts in ``rollout/reward_failures``).
"""

from __future__ import annotations

from typing import Dict, Sequence

from .rewards.math import extract_boxed
from .sample import Sample

TOOL_STATUSES = ("ok", "error", "timeout", "memory", "setup")


def tool_metrics(samples: Sequence[Sample], multi_turn: bool = True) -> Dict[str, float]:
    """The metrics above (the tool ones only with ``multi_turn``)."""
    n = max(len(samples), 1)
    out = {
        "rollout/final_answer_frac": sum(extract_boxed(s.response_text) is not None for s in samples) / n,
        "rollout/reward_timeouts": float(sum(s.metadata.get("reward_status") == "timeout" for s in samples)),
    }
    if not multi_turn:
        return out
    calls = [s.metadata.get("tool_statuses", []) for s in samples]
    out.update({
        "rollout/turns_mean": sum(s.num_turns for s in samples) / n,
        "rollout/tool_calls_mean": sum(len(c) for c in calls) / n,
        "rollout/tool_use_frac": sum(bool(c) for c in calls) / n,
        "rollout/obs_tokens_mean": sum(len(s.loss_mask) - sum(s.loss_mask) for s in samples) / n,
    })
    for status in TOOL_STATUSES:
        out[f"rollout/tool_status_{status}"] = float(sum(c.count(status) for c in calls))
    return out
