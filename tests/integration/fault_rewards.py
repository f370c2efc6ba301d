"""Reward functions for fault-injection runs (rollout.reward = tests.integration.fault_rewards:NAME).

They score like ``synthetic`` and take their cue from environment variables:
- ``slow``: from call ``ALP_FAULT_AFTER`` on, counted over every process that scores (the reward
  worker processes share the count through ``<marker>.calls``, one byte appended per call: a
  per-process counter reached the threshold a step late once a group's samples were scored
  concurrently), writes ``ALP_FAULT_MARKER`` (the pid of the engine servers are unknown here, so
  the test acts on the marker) and sleeps 0.2 s per call;
- ``flaky``: raises on every third call and returns NaN on every fifth.
"""

import math
import os
import time

from rollout.rewards.synthetic import synthetic_reward

_calls = [0]


def slow(prompt, response, label, metadata=None):
    marker = os.environ["ALP_FAULT_MARKER"]
    with open(marker + ".calls", "ab") as f:  # O_APPEND: each process's byte lands whole
        f.write(b"x")
    calls = os.path.getsize(marker + ".calls")  # this call's ordinal or more, over all processes
    if calls >= int(os.environ.get("ALP_FAULT_AFTER", "1")):
        with open(marker, "a") as f:
            f.write(f"{calls}\n")
        time.sleep(0.2)  # the slowness under test (keeps the rollout open for the fault), not a wait
    return synthetic_reward(prompt, response, label, metadata)


def flaky(prompt, response, label, metadata=None):
    _calls[0] += 1
    if _calls[0] % 3 == 0:
        raise KeyError("boom")
    if _calls[0] % 5 == 0:
        return math.nan
    return synthetic_reward(prompt, response, label, metadata)
