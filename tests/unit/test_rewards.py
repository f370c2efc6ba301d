"""Rewards: math-verify on boxed answers, the synthetic tasks, user functions by dotted path."""

import random

import pytest

from rollout.rewards import load_reward_fn
from rollout.rewards.math import extract_boxed, math_reward
from rollout.rewards.synthetic import char_match_score, make_problem, synthetic_records, synthetic_reward


@pytest.mark.parametrize("response, truth", [
    (r"so the answer is \boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac12"),
    (r"\boxed{1/2}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac{3}{4}}", "0.75"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2"),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}"),
    (r"\boxed{(1,2)}", "(1, 2)"),
    (r"\boxed{\{1,2\}}", r"\{2,1\}"),
    (r"first \boxed{3}, corrected: \boxed{42}", "42"),
    (r"The final answer is $\boxed{-7}$.", "-7"),
    (r"\boxed{42}", "$42$"),
])
def test_equivalent_forms_are_accepted(response, truth):
    assert math_reward("", response, truth) == 1.0


@pytest.mark.parametrize("response, truth", [
    (r"\boxed{2}", "3"),
    (r"\boxed{7}", "-7"),
    (r"\boxed{3.14}", r"\pi"),
    (r"\boxed{42} then \boxed{41}", "42"),  # the last box counts
    ("the answer is 0.5", "0.5"),  # no boxed answer
    (r"\boxed{\frac{1}{2", "0.5"),  # cut off
    (r"\boxed{x+1}", "x-1"),
    (r"\boxed{}", "0"),
])
def test_wrong_answers_are_rejected(response, truth):
    assert math_reward("", response, truth) == 0.0


def test_extract_boxed_balances_braces():
    assert extract_boxed(r"a \boxed{\frac{1}{\sqrt{2}}} b") == r"\frac{1}{\sqrt{2}}"
    assert extract_boxed(r"\fbox{5}") == "5"
    assert extract_boxed("nothing") is None


def test_synthetic_tasks_and_dense_reward():
    rng = random.Random(0)
    p, a = make_problem("copy", 3, rng)
    assert p == f"c:{a}=" and len(a) == 3
    p, a = make_problem("reverse", 4, rng)
    assert p[2:-1][::-1] == a
    p, a = make_problem("add", 2, rng)
    x, y = p[2:-1].split("+")
    assert int(x) + int(y) == int(a)
    assert char_match_score("381", "381") == 1.0
    assert char_match_score("391", "381") == pytest.approx(2 / 3)
    assert char_match_score("3810", "381") == pytest.approx(3 / 4)  # extra characters cost
    assert char_match_score("", "381") == 0.0
    assert synthetic_reward("c:381=", "381", "381", {}) == 1.0
    recs = synthetic_records(5, "reverse", 2, seed=1)
    assert recs == synthetic_records(5, "reverse", 2, seed=1) and all(r["task"] == "reverse" for r in recs)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_problem("divide", 2, rng)


def test_user_reward_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length_reward(prompt, response, label, metadata):\n"
        "    return float(len(response) == label) + metadata.get('bonus', 0)\n"
        "async def async_reward(prompt, response, label, metadata):\n"
        "    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_fn("my_rewards:length_reward")
    assert fn("p", "abc", 3, {"bonus": 1}) == 2.0
    assert load_reward_fn("my_rewards.length_reward") is fn
    assert load_reward_fn("math") is math_reward and load_reward_fn("synthetic") is synthetic_reward
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_reward_fn("my_rewards:missing")
    with pytest.raises(ValueError, match="expected"):
        load_reward_fn("nodots")
