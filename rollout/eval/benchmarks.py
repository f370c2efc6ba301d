"""The benchmark registry and the loading of benchmark files into prompts.

Benchmark files are used as the usual dataset dumps write them (JSONL or Parquet; nothing is
downloaded). Each registry entry names the fields its dumps carry, in order of preference: the
first field present in the file is used. A file whose records carry none of them is refused with
the fields it does have. A user's own benchmark: ``NAME=PATH`` with a NAME outside the registry
uses ``eval.prompt_key`` / ``eval.label_key`` (dotted keys reach into nested records, e.g.
``reward_model.ground_truth`` of verl's parquet files).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import DataConfig
from ..data import Prompt, read_records, render_prompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's question and answer are in the usual dumps of it."""

    prompt_keys: Tuple[str, ...]
    label_keys: Tuple[str, ...]
    source: str
    """The dumps these field names come from."""


_VERL = ("prompt",), ("reward_model.ground_truth",)
# Field names of the dumps users have (checked against each dataset card / file): one source of
# truth for which fields a benchmark file must carry.
BENCHMARKS: Dict[str, BenchmarkSpec] = {
    "aime2024": BenchmarkSpec(("problem", "Problem", "question", "prompt"),
                              ("answer", "Answer", "gt", "reward_model.ground_truth"),
                              "HuggingFaceH4/aime_2024 (problem, answer); Maxwell-Jia/AIME_2024 (Problem, Answer); "
                              "weqweasdas/aime24 (problem, gt: the ALP reference's single-turn eval)"),
    "aime2025": BenchmarkSpec(("problem", "question", "prompt"), ("answer", "gt", "reward_model.ground_truth"),
                              "math-ai/aime25, yentinglin/aime_2025 (problem, answer); opencompass/AIME2025 "
                              "(question, answer); Chenlu123/aime25 (problem, gt)"),
    "math500": BenchmarkSpec(("problem", "prompt"), ("answer", "gt", "reward_model.ground_truth"),
                             "HuggingFaceH4/MATH-500 (problem, answer); weqweasdas/math500 (problem, gt); "
                             "the ALP reference's multi-turn datasets/deepscaler/math500.parquet (verl format)"),
    "amc2023": BenchmarkSpec(("question", "problem", "prompt"), ("answer", "gt", "reward_model.ground_truth"),
                             "math-ai/amc23 (question, answer); AI-MO/aimo-validation-amc (problem, answer)"),
    "minerva": BenchmarkSpec(("question", "problem", "prompt"), ("answer", "gt", "reward_model.ground_truth"),
                             "math-ai/minervamath (question, answer); weqweasdas/minerva_math (problem, gt); "
                             "datasets/deepscaler/minerva_math.parquet (verl format)"),
    "olympiadbench": BenchmarkSpec(("question", "problem", "prompt"),
                                   ("final_answer", "answer", "gt", "reward_model.ground_truth"),
                                   "Hothan/OlympiadBench (question, final_answer: a list); math-ai/olympiadbench "
                                   "(question, answer); datasets/deepscaler/olympiadbench.parquet (verl format)"),
    "verl": BenchmarkSpec(*_VERL, "any verl-format parquet: prompt (chat messages), reward_model.ground_truth"),
}
ALIASES = {"aime24": "aime2024", "aime": "aime2024", "aime_2024": "aime2024", "aime25": "aime2025",
           "aime_2025": "aime2025", "math-500": "math500", "math_500": "math500", "amc23": "amc2023",
           "amc": "amc2023", "minerva_math": "minerva", "minervamath": "minerva", "olympiad": "olympiadbench"}


def lookup(record: Dict[str, Any], key: str) -> Any:
    """``record[key]``, with dots reaching into nested dicts; raises KeyError when absent."""
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def has_key(record: Dict[str, Any], key: str) -> bool:
    try:
        lookup(record, key)
        return True
    except KeyError:
        return False


def parse_dataset(spec: str) -> Tuple[str, str]:
    """``PATH`` or ``NAME=PATH`` -> (name, path); the name defaults to the file's stem."""
    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, os.path.splitext(os.path.basename(spec))[0]
    if not path:
        raise ValueError(f"eval.datasets entry '{spec}' has no file path")
    return name, path


def resolve_spec(name: str, prompt_key: str, label_key: str) -> Tuple[str, BenchmarkSpec]:
    """(registry name or the user's name, its field spec)."""
    key = name.lower()
    key = ALIASES.get(key, key)
    if key in BENCHMARKS:
        return key, BENCHMARKS[key]
    return name, BenchmarkSpec((prompt_key,), (label_key,), "user benchmark (eval.prompt_key, eval.label_key)")


def _pick(records: Sequence[Dict[str, Any]], keys: Sequence[str], what: str, name: str, path: str) -> str:
    for key in keys:
        if has_key(records[0], key):
            missing = [i for i, r in enumerate(records) if not has_key(r, key)]
            if missing:
                raise ValueError(f"{path}: record {missing[0]} has no '{key}' field ({what} of benchmark {name})")
            return key
    raise ValueError(f"{path}: benchmark '{name}' needs a field for its {what}, one of {list(keys)}; "
                     f"the records have {sorted(records[0])}")


def _label(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]  # OlympiadBench's final_answer is a one-element list
    return value


def load_benchmark(spec: str, tokenizer, data_cfg: DataConfig, *, prompt_key: str = "problem",
                   label_key: str = "answer", instruction: Optional[str] = None,
                   max_problems: int = 0) -> Tuple[str, List[Prompt], int]:
    """(name, prompts, dropped) of one ``eval.datasets`` entry, rendered as training renders prompts."""
    name, path = parse_dataset(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"eval dataset {name}: no file {path}")
    records = read_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    name, bench = resolve_spec(name, prompt_key, label_key)
    pkey = _pick(records, bench.prompt_keys, "prompt", name, path)
    lkey = _pick(records, bench.label_keys, "answer", name, path)
    if max_problems:
        records = records[:max_problems]
    prompts, dropped = [], 0
    for i, rec in enumerate(records):
        question = lookup(rec, pkey)
        if instruction and isinstance(question, str):
            question = f"{question} {instruction}"
        text, ids = render_prompt(question, tokenizer, data_cfg)
        if len(ids) > data_cfg.max_prompt_len:
            dropped += 1
            continue
        prompts.append(Prompt(ids, text, _label(lookup(rec, lkey)), {"benchmark": name}, i))
    if dropped:
        logger.warning("%s: %d of %d prompts over %d tokens dropped", name, dropped, len(records),
                       data_cfg.max_prompt_len)
    if not prompts:
        raise ValueError(f"{path}: every prompt of benchmark {name} exceeds {data_cfg.max_prompt_len} tokens")
    return name, prompts, dropped
