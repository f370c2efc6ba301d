"""Prompt datasets: JSONL / Parquet records -> tokenized prompts, and a resumable batch stream.

A record holds the prompt under ``data.prompt_key`` (a string, or a list of chat messages
``{"role", "content"}``) and the ground truth under ``data.label_key``; both may be dotted paths
into nested fields (verl's layout keeps the answer at ``reward_model.ground_truth``). A record
without its label fails the load (``data.require_label``): a missing label would otherwise score
every sample 0 and train on nothing. Other fields are kept as metadata for the reward function.
``data.instruction`` (literal or a name from :mod:`rollout.prompts`) is prepended to the first user
message, as the reference's ``data.prompt``. With ``apply_chat_template`` and a tokenizer that has a chat
template, the prompt is rendered with it (``add_generation_prompt=True``). Prompts longer than
``max_prompt_len`` tokens are dropped or left-truncated (their end, where the question and the
generation prompt are, is kept); the count is logged and returned.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .config import DataConfig
from .prompts import resolve_instruction

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    """A tokenized prompt with its ground truth."""

    prompt_ids: List[int]
    text: str
    label: Any = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    index: int = 0
    """Position of the record in the dataset file."""


def read_records(path: str) -> List[Dict[str, Any]]:
    """Records of a ``.jsonl`` / ``.json`` (one object per line) or ``.parquet`` file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object: {e}") from None
    return records


_MISSING = object()


def get_field(record: Dict[str, Any], key: str, default: Any = _MISSING) -> Any:
    """``record[key]``, where a dotted ``key`` (``reward_model.ground_truth``) walks nested dicts.

    A top-level field whose name contains the dot wins. Raises ``KeyError`` without ``default``.
    """
    if key in record:
        return record[key]
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def with_instruction(prompt: Any, instruction: str) -> Any:
    """``prompt`` with ``instruction`` prepended to its first user message (or to the string)."""
    if not instruction:
        return prompt
    if not isinstance(prompt, list):
        return instruction + str(prompt)
    out = [dict(m) for m in prompt]
    for m in out:
        if m.get("role") == "user":
            m["content"] = instruction + str(m.get("content", ""))
            return out
    return out + [{"role": "user", "content": instruction}]


def render_prompt(prompt: Any, tokenizer, cfg: DataConfig) -> Tuple[str, List[int]]:
    """(text, token ids) of one prompt, through the chat template when configured and available."""
    prompt = with_instruction(prompt, resolve_instruction(cfg.instruction))
    templated = cfg.apply_chat_template and getattr(tokenizer, "chat_template", None)
    if templated:
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        if cfg.system_prompt and (not messages or messages[0].get("role") != "system"):
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template writes any BOS itself; letting the tokenizer add one would double it.
        return text, tokenizer.encode(text, add_special_tokens=False)
    if isinstance(prompt, list):
        raise ValueError("a chat-message prompt needs data.apply_chat_template and a tokenizer with a chat template")
    text = str(prompt)
    return text, tokenizer.encode(text, add_special_tokens=True)


def build_prompts(records: Iterable[Dict[str, Any]], tokenizer, cfg: DataConfig) -> Tuple[List[Prompt], Dict[str, int]]:
    """Tokenize ``records``; apply the length policy. Returns (prompts, counts)."""
    prompts: List[Prompt] = []
    counts = {"total": 0, "dropped": 0, "truncated": 0}
    for i, rec in enumerate(records):
        counts["total"] += 1
        prompt = get_field(rec, cfg.prompt_key, None)
        if prompt is None:
            raise KeyError(f"record {i} has no '{cfg.prompt_key}' field (rollout.data.prompt_key); keys: {sorted(rec)}")
        label = get_field(rec, cfg.label_key, None)
        if label is None and cfg.require_label:
            raise KeyError(f"record {i} has no '{cfg.label_key}' field (rollout.data.label_key; verl files keep "
                           f"it at reward_model.ground_truth, tools/convert_data.py converts); keys: {sorted(rec)}")
        text, ids = render_prompt(prompt, tokenizer, cfg)
        if len(ids) > cfg.max_prompt_len:
            if cfg.overlong == "drop":
                counts["dropped"] += 1
                continue
            ids = ids[-cfg.max_prompt_len:]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            counts["truncated"] += 1
        meta = {k: v for k, v in rec.items() if k not in (cfg.prompt_key, cfg.label_key)}
        prompts.append(Prompt(ids, text, label, meta, i))
    if counts["dropped"] or counts["truncated"]:
        logger.warning("prompts over rollout.data.max_prompt_len = %d tokens: %d dropped, %d truncated (of %d)",
                       cfg.max_prompt_len, counts["dropped"], counts["truncated"], counts["total"])
    return prompts, counts


def load_prompts(cfg: DataConfig, tokenizer, path: Optional[str] = None) -> List[Prompt]:
    """Read and tokenize ``path`` (default ``cfg.path``)."""
    path = path or cfg.path
    if not path:
        raise ValueError("rollout.data.path is not set")
    prompts, counts = build_prompts(read_records(path), tokenizer, cfg)
    if not prompts:
        raise ValueError(f"{path}: no usable prompt ({counts})")
    logger.info("%s: %d prompts (%s)", path, len(prompts), counts)
    return prompts


class PromptStream:
    """Endless batches over ``prompts``, reshuffled every epoch from ``seed``; resumable.

    ``state_dict()`` / ``load_state_dict()`` capture (epoch, cursor): the next batch after a
    restore is the one that would have come next.
    """

    def __init__(self, prompts: List[Prompt], seed: int = 0, shuffle: bool = True):
        if not prompts:
            raise ValueError("PromptStream needs at least one prompt")
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> List[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> List[Prompt]:
        out = []
        while len(out) < size:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.prompts[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._make_order()
