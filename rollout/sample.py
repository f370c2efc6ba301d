"""The unit of rollout output handed to the trainer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class Sample:
    """One response to one prompt, with everything the RL objective needs.

    ``response_ids``, ``rollout_logprobs`` and ``loss_mask`` have the same length. Model tokens
    have ``loss_mask = 1`` and the engine's log-prob; tool observation tokens (multi-turn) have
    ``loss_mask = 0`` and no log-prob: their ``rollout_logprobs`` entry is a 0.0 placeholder that
    must never be used (multiply by the mask).
    """

    prompt_ids: List[int]
    """Tokens of the prompt (after the chat template)."""
    response_ids: List[int] = field(default_factory=list)
    """Every token after the prompt: model turns and tool observations, in order."""
    rollout_logprobs: List[float] = field(default_factory=list)
    """log_softmax(logits / T) of each response token under the rollout engine (0.0 where masked)."""
    loss_mask: List[int] = field(default_factory=list)
    """1 for tokens the model generated, 0 for tool observation tokens."""
    finish_reason: str = "length"
    """How the last turn ended: 'stop', 'length' or 'abort'."""
    reward: float = 0.0
    """Scalar reward of the whole response."""
    weight_version: Optional[str] = None
    """Weight version that generated the (last turn of the) response."""
    group_id: int = 0
    """Index of the prompt in its batch: samples of one prompt form one GRPO group."""
    index: int = 0
    """Index of the sample inside its group."""
    label: Any = None
    """Ground truth from the dataset (what the reward compared against)."""
    response_text: str = ""
    """Decoded response (model and observation text)."""
    num_turns: int = 1
    """Model turns (multi-turn: tool calls + 1)."""
    weight_versions: List[Optional[str]] = field(default_factory=list)
    """Weight version of each generate request of the sample, in order (a multi-turn turn takes two
    when it continues after an opening code fence; versions can differ if weights changed between)."""
    metadata: Dict[str, Any] = field(default_factory=dict)
    """Free-form extras (tool statuses, dataset fields)."""

    def append(self, ids: List[int], logprobs: Optional[List[float]], trainable: bool) -> None:
        """Append model tokens (with their log-probs) or observation tokens (``trainable=False``)."""
        if trainable:
            if logprobs is None or len(logprobs) != len(ids):
                raise ValueError(f"model tokens need one log-prob each: {len(ids)} ids, "
                                 f"{None if logprobs is None else len(logprobs)} log-probs")
            self.rollout_logprobs.extend(float(x) for x in logprobs)
        else:
            self.rollout_logprobs.extend([0.0] * len(ids))
        self.response_ids.extend(int(t) for t in ids)
        self.loss_mask.extend([1 if trainable else 0] * len(ids))

    @property
    def num_model_tokens(self) -> int:
        return sum(self.loss_mask)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
