"""Evaluate benchmarks with the training stack: generate ``n`` samples per problem on an engine
(or fleet), score them with the training reward, summarise and write the tables.

Generation is :class:`rollout.generate.RolloutGenerator` (single-turn, or the multi-turn tool
loop with the sandbox when ``rollout.multi_turn.enabled``), so evaluation sees exactly the chat
template, stop tokens, tool protocol and reward function of training.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

from ..config import RolloutConfig
from ..sample import Sample
from .benchmarks import load_benchmark
from .config import EvalConfig
from .metrics import BenchmarkResult, report_ks, summarize

logger = logging.getLogger(__name__)


@dataclass
class BenchmarkRun:
    result: BenchmarkResult
    samples: List[Sample]


def eval_rollout_config(rollout: RolloutConfig, ev: EvalConfig) -> RolloutConfig:
    """The rollout settings of evaluation: training's, with eval's sampling and budgets."""
    cfg = copy.deepcopy(rollout)
    cfg.n_samples, cfg.temperature, cfg.top_p = ev.n, ev.temperature, ev.top_p
    if ev.max_new_tokens:
        cfg.max_new_tokens = ev.max_new_tokens
    if ev.max_response_len:
        cfg.multi_turn.max_response_len = ev.max_response_len
    if ev.max_prompt_len:
        cfg.data.max_prompt_len = ev.max_prompt_len
    return cfg


async def evaluate(engine, tokenizer, rollout: RolloutConfig, ev: EvalConfig, *, reward_fn=None,
                   sandbox=None) -> List[BenchmarkRun]:
    """Every benchmark of ``ev.datasets``, in order."""
    from ..generate import RolloutGenerator

    ev.validate()
    if not ev.datasets:
        raise ValueError("eval.datasets is empty: nothing to evaluate")
    cfg = eval_rollout_config(rollout, ev)
    gen = RolloutGenerator(engine, tokenizer, cfg, reward_fn=reward_fn, sandbox=sandbox)
    loaded = [load_benchmark(spec, tokenizer, cfg.data, prompt_key=ev.prompt_key, label_key=ev.label_key,
                             instruction=ev.instruction, max_problems=ev.max_problems) for spec in ev.datasets]
    runs = []
    try:
        for name, prompts, dropped in loaded:
            t0 = time.perf_counter()
            samples = await gen.generate(prompts, seed=ev.seed)
            runs.append(BenchmarkRun(_summary(name, prompts, samples, ev, dropped), samples))
            r = runs[-1].result
            logger.info("eval %s: %d problems x %d samples in %.1f s: avg@%d %.4f, pass@%d %.4f", name, r.problems,
                        r.n, time.perf_counter() - t0, r.n, r.avg_at_n, r.n, r.pass_at[r.n])
    finally:
        gen.close()  # its reward worker processes
    return runs


def _summary(name: str, prompts: Sequence, samples: List[Sample], ev: EvalConfig, dropped: int) -> BenchmarkResult:
    n = ev.n
    groups = [samples[g * n:(g + 1) * n] for g in range(len(prompts))]
    return summarize(name, [[s.reward for s in g] for g in groups], [[len(s.response_ids) for s in g] for g in groups],
                     [[s.finish_reason == "length" for s in g] for g in groups], ev.correct_threshold, dropped)


def scalars(runs: Sequence[BenchmarkRun]) -> Dict[str, float]:
    """All ``eval/<benchmark>/...`` series of a set of runs."""
    out: Dict[str, float] = {}
    for run in runs:
        out.update(run.result.scalars())
    return out


def summary_line(runs: Sequence[BenchmarkRun]) -> str:
    """One terminal line: ``eval math500 avg@16 0.412 pass@16 0.80 | ...``."""
    parts = [f"{r.result.name} avg@{r.result.n} {r.result.avg_at_n:.4f} "
             f"pass@{r.result.n} {r.result.pass_at[r.result.n]:.4f}"
             for r in runs]
    return "eval " + " | ".join(parts)


def markdown_table(results: Sequence[BenchmarkResult]) -> str:
    n = results[0].n
    ks = report_ks(n)
    head = ["benchmark", "problems", "samples", f"avg@{n}", *[f"pass@{k}" for k in ks], "mean response len",
            "truncated"]
    rows = [head, ["---"] * len(head)]
    for r in results:
        rows.append([r.name, str(r.problems), str(r.samples), f"{100 * r.avg_at_n:.2f}",
                     *[f"{100 * r.pass_at[k]:.2f}" for k in ks], f"{r.mean_response_len:.1f}",
                     f"{100 * r.truncation_rate:.1f}%"])
    if len(results) > 1:
        avg = sum(r.avg_at_n for r in results) / len(results)
        rows.append(["**average**", "", "", f"{100 * avg:.2f}", *[""] * len(ks), "", ""])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def write_report(runs: Sequence[BenchmarkRun], out_dir: str, *, title: str = "",
                 threshold: float = 1.0) -> Dict[str, str]:
    """``results.md`` (avg@n, pass@k at powers of two), ``results.csv`` (pass@k for every k),
    ``samples.jsonl`` (every sample). Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    results = [r.result for r in runs]
    paths = {name: os.path.join(out_dir, name) for name in ("results.md", "results.csv", "samples.jsonl")}
    with open(paths["results.md"], "w") as f:
        if title:
            f.write(f"# {title}\n\n")
        f.write("Scores in percent; avg@n = mean accuracy over n samples per problem, pass@k = unbiased "
                "estimator (Chen et al. 2021).\n\n")
        f.write(markdown_table(results))
    n = results[0].n
    with open(paths["results.csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["benchmark", "problems", "samples", "n", f"avg@{n}", "reward_mean", "mean_response_len",
                    "truncation_rate", "dropped_prompts", *[f"pass@{k}" for k in range(1, n + 1)]])
        for r in results:
            w.writerow([r.name, r.problems, r.samples, r.n, r.avg_at_n, r.reward_mean, r.mean_response_len,
                        r.truncation_rate, r.dropped_prompts, *[r.pass_at[k] for k in range(1, r.n + 1)]])
    with open(paths["samples.jsonl"], "w") as f:
        for run in runs:
            for s in run.samples:
                f.write(json.dumps(sample_record(run.result.name, s, threshold)) + "\n")
    return paths


def sample_record(benchmark: str, s: Sample, threshold: float = 1.0) -> Dict:
    return {"benchmark": benchmark, "problem": s.group_id, "sample": s.index, "label": _jsonable(s.label),
            "reward": s.reward, "correct": s.reward >= threshold, "response": s.response_text,
            "response_tokens": len(s.response_ids),
            "model_tokens": s.num_model_tokens, "finish_reason": s.finish_reason, "num_turns": s.num_turns,
            "tool_statuses": s.metadata.get("tool_statuses", []), "weight_version": s.weight_version}


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return str(x)
