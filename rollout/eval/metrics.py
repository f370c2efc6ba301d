"""avg@n and pass@k of one benchmark, from scored samples grouped by problem.

Definitions (cited where they come from):

- ``avg@n``: the mean over problems of the fraction of a problem's ``n`` samples that are correct,
  i.e. the mean accuracy over all ``problems x n`` samples. With 0/1 rewards (math-verify) this
  is the ALP reference's score (single-turn/eval_benchmark/compute_score.py: ``np.mean`` of the
  per-sample scores of every problem) and the papers' "Average@n".
- ``pass@k`` for ``k <= n``: the unbiased estimator of Chen et al. 2021 ("Evaluating Large
  Language Models Trained on Code", eq. 1), ``1 - C(n - c, k) / C(n, k)`` per problem with ``c``
  correct samples out of ``n``, averaged over problems; computed as the product
  ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` which never forms the large binomials.
- A sample is correct when its reward is ``>= eval.correct_threshold`` (1.0 by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct out of ``n`` samples (Chen et al. 2021)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n} samples per problem")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def report_ks(n: int) -> List[int]:
    """The k of the short table and TensorBoard: powers of two below n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


@dataclass
class BenchmarkResult:
    """The summary row of one benchmark."""

    name: str
    problems: int
    samples: int
    n: int
    avg_at_n: float
    pass_at: Dict[int, float] = field(default_factory=dict)
    """pass@k for every k in 1..n."""
    reward_mean: float = 0.0
    mean_response_len: float = 0.0
    """Response tokens per sample (model and tool-observation tokens)."""
    truncation_rate: float = 0.0
    """Fraction of samples that ended on the length budget (finish reason 'length')."""
    dropped_prompts: int = 0
    """Problems left out because their prompt exceeded the prompt budget."""

    def scalars(self) -> Dict[str, float]:
        """``eval/<name>/...`` series for TensorBoard (pass@k at :func:`report_ks`)."""
        out = {f"eval/{self.name}/avg@{self.n}": self.avg_at_n,
               f"eval/{self.name}/reward_mean": self.reward_mean,
               f"eval/{self.name}/response_len_mean": self.mean_response_len,
               f"eval/{self.name}/truncation_rate": self.truncation_rate}
        for k in report_ks(self.n):
            out[f"eval/{self.name}/pass@{k}"] = self.pass_at[k]
        return out


def summarize(name: str, rewards: Sequence[Sequence[float]], lengths: Sequence[Sequence[int]],
              truncated: Sequence[Sequence[bool]], threshold: float = 1.0, dropped: int = 0) -> BenchmarkResult:
    """Summary of a benchmark from per-problem lists of rewards, response lengths, truncation flags."""
    if not rewards:
        raise ValueError(f"benchmark {name}: no problem was evaluated")
    n = len(rewards[0])
    if n < 1 or any(len(r) != n for r in rewards):
        raise ValueError(f"benchmark {name}: every problem needs the same number (>= 1) of samples")
    correct = [sum(float(x) >= threshold for x in r) for r in rewards]
    problems = len(rewards)
    flat = [float(x) for r in rewards for x in r]
    flat_len = [int(x) for r in lengths for x in r]
    flat_trunc = [bool(x) for r in truncated for x in r]
    return BenchmarkResult(
        name=name, problems=problems, samples=len(flat), n=n,
        avg_at_n=sum(c / n for c in correct) / problems,
        pass_at={k: sum(pass_at_k(n, c, k) for c in correct) / problems for k in range(1, n + 1)},
        reward_mean=sum(flat) / len(flat),
        mean_response_len=sum(flat_len) / len(flat_len),
        truncation_rate=sum(flat_trunc) / len(flat_trunc),
        dropped_prompts=dropped)
