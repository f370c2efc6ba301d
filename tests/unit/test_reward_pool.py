"""Rewards in worker processes: right scores, a hard timeout that scores 0, the event loop never blocked."""

import asyncio
import time

from rollout.config import RolloutConfig
from rollout.rewards.pool import RewardPool


def hanging_reward(prompt, response, label, metadata=None):
    """Holds its process (and its GIL) far past any timeout, like a pathological SymPy parse."""
    while True:
        pass


def failing_reward(prompt, response, label, metadata=None):
    raise ValueError("bad label")


def test_math_reward_scores_in_workers():
    pool = RewardPool("math", workers=2, timeout_s=60)
    try:
        async def go():
            return await asyncio.gather(pool.score("", "so \\boxed{\\frac{1}{2}}", "0.5", {}),
                                        pool.score("", "so \\boxed{3}", "4", {}),
                                        pool.score("", "no answer", "4", {}))
        assert asyncio.run(go()) == [(1.0, "ok"), (0.0, "ok"), (0.0, "ok")]
    finally:
        pool.close()


def test_timeout_scores_zero_counts_and_never_blocks_the_loop():
    pool = RewardPool(f"{__name__}:hanging_reward", workers=1, timeout_s=1.0)
    try:
        async def go():
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            t = asyncio.create_task(ticker())
            out = await pool.score("", "\\boxed{10^{10^{10^{10}}}}", "1", {})
            t.cancel()
            return out, ticks

        t0 = time.monotonic()
        (value, status), ticks = asyncio.run(go())
        assert (value, status) == (0.0, "timeout") and pool.counts["timeout"] == 1
        assert ticks >= 10  # the loop kept running while the worker was stuck
        assert time.monotonic() - t0 < 60
        assert pool._idle.qsize() == 1 and pool._idle.queue[0].proc.is_alive()  # replaced, ready again
    finally:
        pool.close()


def test_errors_score_zero():
    pool = RewardPool(f"{__name__}:failing_reward", workers=1, timeout_s=30)
    try:
        assert asyncio.run(pool.score("", "x", "1", {})) == ("ValueError: bad label", "error")
        assert pool.counts["error"] == 1
    finally:
        pool.close()


def test_generator_uses_the_pool_for_named_rewards_only():
    from rollout.generate import RolloutGenerator

    gen = RolloutGenerator(object(), None, RolloutConfig(reward="math", reward_workers=2))
    assert gen.reward_pool is not None and gen.reward_pool.timeout_s == 120.0
    gen.close()
    assert RolloutGenerator(object(), None, RolloutConfig(reward="synthetic")).reward_pool is None
    assert RolloutGenerator(object(), None, RolloutConfig(reward="math", reward_workers=0)).reward_pool is None
