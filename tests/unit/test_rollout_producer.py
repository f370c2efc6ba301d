"""Asynchronous rollout (rollout.producer): the staleness bound, whole one-version groups, the same
prompts and seeds as the synchronous loop, resume without loss or repeats, engine failover.

The trainer is simulated: after taking step s's batch it "trains" and commits version s + 1 to
the fake engines, which tag each response with the version they hold when it finishes (so
responses span updates, as with SGLang's in-place pause).
"""

import asyncio
import random

import pytest

from rollout.config import RolloutConfig
from rollout.data import Prompt, PromptStream
from rollout.engines.protocol import EngineUnavailable, GenerateOutput
from rollout.fleet import Fleet
from rollout.generate import RolloutGenerator
from rollout.producer import GroupProducer, sample_oldest_version
from rollout.tiny_model import build_char_tokenizer

P, N = 3, 4  # prompts per step, samples per prompt


class VersionedEngine:
    """Answers after a random short delay with the version it holds at the end; can die."""

    def __init__(self, url="http://fake", seed=0, die_after=None, mislabel_first=0):
        self.url, self.version, self.rng = url, "0", random.Random(seed)
        self.calls, self.die_after, self.mislabel_first, self.seeds = 0, die_after, mislabel_first, []

    async def generate(self, input_ids, params, *, rid=None, return_logprob=True):
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after:
            raise EngineUnavailable(self.url, "connection refused")
        self.seeds.append(params.get("sampling_seed"))
        for _ in range(self.rng.randint(0, 3)):
            await asyncio.sleep(0.001)
        version = "0" if self.calls <= self.mislabel_first else self.version
        return GenerateOutput(self.url, [5, 6], [-0.5, -0.25], "length", {"type": "length"}, version)

    async def health(self, timeout_s=5.0):
        return self.die_after is None or self.calls <= self.die_after

    async def weight_version(self):
        return self.version

    async def close(self):
        pass


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer("full")


def _prompts(tok, n=7):
    return [Prompt(tok.encode(f"q{i}", add_special_tokens=False), f"q{i}", str(i), index=i) for i in range(n)]


def _producer(tok, engine, k, policy="reissue", start=0, state=None):
    cfg = RolloutConfig(n_samples=N, max_new_tokens=2)
    gen = RolloutGenerator(engine, tok, cfg, reward_fn=lambda *a: 0.0)
    stream = PromptStream(_prompts(tok), seed=3)
    if state:
        stream.load_state_dict(state)
    return GroupProducer(gen, stream, prompts_per_step=P, max_staleness=k, seed=100, start_step=start,
                         span_policy=policy)


def _run(prod, engines, steps, start=0):
    """The trainer loop: take step s (at version s), then commit version s + 1."""
    taken = {}
    prod.start(start)
    try:
        for s in range(start, steps):
            prod.set_version(s)
            taken[s] = prod.take(s, timeout=60)
            for e in engines:
                e.version = str(s + 1)
        state = prod.stream_state(steps)
    finally:
        prod.close()
    return taken, state


@pytest.mark.parametrize("k,policy", [(1, "reissue"), (2, "reissue"), (1, "keep"), (2, "keep")])
def test_no_sample_staler_than_k_and_groups_whole(tok, k, policy):
    engine = VersionedEngine(seed=k)
    taken, _ = _run(_producer(tok, engine, k, policy), [engine], steps=6)
    stream = PromptStream(_prompts(tok), seed=3)  # the synchronous loop's prompts, step by step
    for s, groups in taken.items():
        assert [g.group_id for g in groups] == list(range(P))
        assert [g.prompt_index for g in groups] == [p.index for p in stream.next_batch(P)]
        for g in groups:
            assert len(g.samples) == N and [x.index for x in g.samples] == list(range(N))
            assert all(x.group_id == g.group_id for x in g.samples)
            oldest = [sample_oldest_version(x, g.issued_version, policy == "keep") for x in g.samples]
            assert all(0 <= s - v <= k for v in oldest), (s, oldest)
            assert g.version == min(oldest) and g.issued_version >= s - k
            if policy == "reissue":  # one version per group: mixed groups were resampled
                assert len({x.weight_version for x in g.samples}) == 1


def test_sampling_seeds_match_the_synchronous_loop(tok):
    engine = VersionedEngine()
    _run(_producer(tok, engine, 1), [engine], steps=3)
    sync = VersionedEngine()
    gen = RolloutGenerator(sync, tok, RolloutConfig(n_samples=N, max_new_tokens=2), reward_fn=lambda *a: 0.0)
    stream = PromptStream(_prompts(tok), seed=3)
    per_step = []
    for s in range(4):
        gen.generate_sync(stream.next_batch(P), seed=100 + s)
        per_step.append(set(sync.seeds))
    # Steps 0-2 were trained; with k = 1 step 3 may have started at version 2. Resampled samples
    # reuse their own seeds: no seed outside the synchronous loop's.
    assert per_step[2] <= set(engine.seeds) <= per_step[3]


def test_mislabelled_stale_groups_are_regenerated_not_trained(tok):
    engine = VersionedEngine(mislabel_first=40)  # claims version 0 for its first 40 answers
    taken, _ = _run(_producer(tok, engine, 1, "keep"), [engine], steps=5)
    regenerated = sum(g.regenerated for groups in taken.values() for g in groups)
    assert regenerated > 0
    for s, groups in taken.items():
        assert all(g.version >= s - 1 for g in groups)


def test_resume_loses_and_repeats_nothing(tok):
    full_engine = VersionedEngine()
    full, _ = _run(_producer(tok, full_engine, 2), [full_engine], steps=6)
    a = VersionedEngine()
    first, state = _run(_producer(tok, a, 2), [a], steps=3)  # checkpoint before step 3
    b = VersionedEngine()
    b.version = "3"  # the resumed engines start on the checkpoint's version
    second, _ = _run(_producer(tok, b, 2, start=3, state=state), [b], steps=6, start=3)
    resumed = {**first, **second}
    assert sorted(resumed) == list(range(6))
    trained = lambda run: [(s, g.group_id, g.prompt_index) for s in sorted(run) for g in run[s]]  # noqa: E731
    assert trained(resumed) == trained(full)
    # In-flight work at the checkpoint was discarded: step 3 onwards comes from the resumed weights.
    assert all(g.version >= 3 for s in range(3, 6) for g in second[s])


def test_engine_killed_mid_run_loses_no_sample(tok):
    live, dying = VersionedEngine("http://a", seed=1), VersionedEngine("http://b", seed=2, die_after=5)

    async def make():
        return Fleet([live, dying], max_concurrent=8)

    from rollout.aio import run_sync

    fleet = run_sync(make())
    taken, _ = _run(_producer(tok, fleet, 1), [live, dying], steps=4)
    assert dying.calls > 5  # it died mid-run, with requests routed to it
    assert fleet.live_urls == ["http://a"]
    for s, groups in taken.items():
        assert len(groups) == P and all(len(g.samples) == N for g in groups)
        assert all(x.weight_version is not None and s - g.version <= 1 for g in groups for x in g.samples)


def test_bad_config():
    with pytest.raises(ValueError, match="max_staleness"):
        GroupProducer(None, None, prompts_per_step=1, max_staleness=0, seed=0, start_step=0)
    with pytest.raises(ValueError, match="span_policy"):
        GroupProducer(None, None, prompts_per_step=1, max_staleness=1, seed=0, start_step=0, span_policy="x")
