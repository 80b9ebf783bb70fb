"""Judges and win rates: reward judge, the external-judge JSONL round trip, Wilson intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpo_jax.evaluation import judges, rewards


def _length_reward(prompts, completions):
    return np.array([float(len(c)) for c in completions])


# --------------------------------------------------------------------------------------------
# Reward judge
# --------------------------------------------------------------------------------------------


def test_reward_judge_outcomes():
    judge = judges.RewardJudge(_length_reward)
    out = judge(["p"] * 3, ["long answer", "x", "same"], ["short", "longer one", "four"])
    np.testing.assert_array_equal(out, [1.0, 0.0, 0.5])
    margin = judges.RewardJudge(_length_reward, tie_margin=2.0)
    np.testing.assert_array_equal(margin(["p"] * 2, ["abcd", "abcdef"], ["ab", "abc"]), [0.5, 1])


def test_identical_completions_tie_whatever_the_reward():
    noisy = iter([np.array([1.0, 2.0, 0.0, 3.0])])  # scores a, a | b, b with rounding noise
    judge = judges.RewardJudge(lambda p, c: next(noisy))
    np.testing.assert_array_equal(judge(["p", "q"], ["same", "x"], ["same", "y"]), [0.5, 0.0])


def test_reward_judge_with_vader():
    judge = judges.RewardJudge(rewards.VaderSentiment())
    out = judge(
        ["Review: ", "Review: "],
        ["A wonderful, joyful film.", "Dull and awful."],
        ["Dull and awful.", "A wonderful, joyful film."],
    )
    np.testing.assert_array_equal(out, [1.0, 0.0])


def test_reward_judge_bad_inputs():
    judge = judges.RewardJudge(_length_reward)
    with pytest.raises(ValueError, match="RewardJudge: 2 prompts but 1 completions"):
        judge(["a", "b"], ["x", "y"], ["z"])
    with pytest.raises(ValueError, match="RewardJudge: empty"):
        judge([], [], [])
    with pytest.raises(ValueError, match="tie_margin"):
        judges.RewardJudge(_length_reward, tie_margin=-1)
    bad = judges.RewardJudge(lambda p, c: np.zeros(1))
    with pytest.raises(ValueError, match=r"returned shape \(1,\), need \(4,\)"):
        bad(["a", "b"], ["x", "y"], ["z", "w"])


# --------------------------------------------------------------------------------------------
# External judge round trip
# --------------------------------------------------------------------------------------------

N = 40
PROMPTS = [f"post {i}" for i in range(N)]
A = [f"policy summary {i}" for i in range(N)]
B = [f"baseline summary {i}" for i in range(N)]


def _fake_judge(requests_path, verdicts_path, prefers, *, full_answer=False, order=1):
    """An external judge that prefers the text `prefers(first, second) -> 'A' | 'B' | 'tie'`
    and sees only the filled prompt (it reads the two candidates back out of it)."""
    with open(requests_path) as f:
        requests = [json.loads(line) for line in f]
    lines = []
    for r in requests[::order]:
        text = r["judge_prompt"]
        first = text.split("Summary A:\n")[1].split("\n\nSummary B:")[0]
        second = text.split("Summary B:\n")[1].split("\n\nFirst,")[0]
        choice = prefers(first, second)
        verdict = f"Comparison: one is better.\nPreferred: {choice}" if full_answer else choice
        lines.append(json.dumps({"id": r["id"], "verdict": verdict}))
    with open(verdicts_path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_round_trip_undoes_the_random_order(tmp_path):
    requests = tmp_path / "requests.jsonl"
    judges.write_judge_requests(requests, PROMPTS, A, B, template="tldr", seed=3)
    records = [json.loads(line) for line in open(requests)]
    assert [r["id"] for r in records] == [str(i) for i in range(N)]
    positions = [r["a_position"] for r in records]
    # Random order: both positions occur, and not in a fixed pattern.
    assert 10 < positions.count("A") < 30
    for r, i in zip(records, range(N), strict=True):
        assert r["prompt"] == PROMPTS[i] and r["a"] == A[i] and r["b"] == B[i]
        assert f"Post:\n{PROMPTS[i]}\n" in r["judge_prompt"]
        shown_first = A[i] if r["a_position"] == "A" else B[i]
        assert f"Summary A:\n{shown_first}\n" in r["judge_prompt"]
    # Seeded: the same seed writes the same file, another seed another order.
    again = tmp_path / "again.jsonl"
    judges.write_judge_requests(again, PROMPTS, A, B, template="tldr", seed=3)
    assert open(again).read() == open(requests).read()
    other = tmp_path / "other.jsonl"
    judges.write_judge_requests(other, PROMPTS, A, B, template="tldr", seed=4)
    assert [json.loads(line)["a_position"] for line in open(other)] != positions

    verdicts = tmp_path / "verdicts.jsonl"

    def prefer_policy(first, second):
        return "A" if first.startswith("policy") else "B"

    # Verdicts written in reverse order, as full judge answers: a always wins.
    _fake_judge(requests, verdicts, prefer_policy, full_answer=True, order=-1)
    np.testing.assert_array_equal(judges.read_judge_verdicts(requests, verdicts), np.ones(N))

    # A judge that always picks position A: outcomes follow the random positions, and the
    # position-biased judge's win rate is about 1/2 instead of 1.
    _fake_judge(requests, verdicts, lambda first, second: "A")
    out = judges.read_judge_verdicts(requests, verdicts)
    np.testing.assert_array_equal(out, [float(p == "A") for p in positions])

    _fake_judge(requests, verdicts, lambda first, second: "tie")
    np.testing.assert_array_equal(judges.read_judge_verdicts(requests, verdicts), np.full(N, 0.5))


def test_hh_template_and_custom_template(tmp_path):
    path = tmp_path / "hh.jsonl"
    judges.write_judge_requests(path, ["Human: hi"], ["Hello!"], ["Go away."], seed=0)
    text = json.loads(open(path).readline())["judge_prompt"]
    assert "Conversation:\nHuman: hi\n" in text and "More helpful:" in text
    custom = "Q {prompt} | 1 {response_a} | 2 {response_b}"
    judges.write_judge_requests(path, ["q {x}"], ["a"], ["b"], template=custom, seed=0, ids=["k"])
    record = json.loads(open(path).readline())
    assert record["id"] == "k"
    assert record["judge_prompt"] in ("Q q {x} | 1 a | 2 b", "Q q {x} | 1 b | 2 a")
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['\{response_b\}'\]"):
        judges.write_judge_requests(path, ["q"], ["a"], ["b"], template="{prompt}{response_a}")
    with pytest.raises(ValueError, match="need 2 unique ids"):
        judges.write_judge_requests(path, ["q", "r"], ["a", "a"], ["b", "b"], ids=["x", "x"])


@pytest.mark.parametrize(
    "text, want",
    [
        ("A", "A"),
        (' "b" ', "B"),
        ("2", "B"),
        ("Tie", "tie"),
        ("Comparison: B is shorter but misses the point.\nPreferred: A", "A"),
        ('Comparison: x\nMore helpful: "B"', "B"),
        ('Format: Preferred: <"A" or "B">\nComparison: y\nPreferred: B', "B"),
        ("I cannot decide.", None),
    ],
)
def test_parse_verdict(text, want):
    assert judges.parse_verdict(text) == want


def test_read_verdicts_errors(tmp_path):
    requests = tmp_path / "requests.jsonl"
    judges.write_judge_requests(requests, ["p", "q"], ["a", "b"], ["c", "d"], seed=0)
    verdicts = tmp_path / "verdicts.jsonl"

    def check(lines, match):
        verdicts.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=match):
            judges.read_judge_verdicts(requests, verdicts)

    ok0, ok1 = '{"id": "0", "verdict": "A"}', '{"id": "1", "verdict": "B"}'
    check([ok0], r"no verdict for 1 request\(s\), e.g. id '1'")
    check([ok0, ok1, '{"id": "7", "verdict": "A"}'], r"verdicts.jsonl:3 \(id '7'\): no such id")
    check([ok0, ok0], r":2 \(id '0'\): a second verdict")
    check([ok0, '{"id": "1", "verdict": "maybe"}'], r":2 \(id '1'\): cannot read a choice")
    check([ok0, '{"id": "1"}'], "field 'verdict' must be a string")
    check([ok0, "not json"], r"verdicts.jsonl:2: not valid JSON")


# --------------------------------------------------------------------------------------------
# Win rate intervals
# --------------------------------------------------------------------------------------------


def test_win_rate_interval_properties():
    rate, lo, hi = judges.win_rate([1, 1, 0, 0.5])
    assert rate == pytest.approx(0.625) and 0 <= lo < rate < hi <= 1
    # The textbook Wilson interval for 7 of 10 at 95%: (0.3968, 0.8922).
    np.testing.assert_allclose(judges.win_rate([1] * 7 + [0] * 3)[1:], [0.3968, 0.8922], atol=1e-4)
    # All wins: the interval stays below 1 on its low side and reaches 1 on its high side.
    rate, lo, hi = judges.win_rate(np.ones(20))
    assert rate == 1.0 and hi == 1.0 and 0.8 < lo < 1.0
    # More data, narrower; more confidence, wider.
    small = judges.win_rate([1, 0] * 10)
    large = judges.win_rate([1, 0] * 1000)
    assert large[2] - large[1] < (small[2] - small[1]) / 5
    wide = judges.win_rate([1, 0] * 10, confidence=0.99)
    assert wide[1] < small[1] and wide[2] > small[2]


def test_win_rate_coverage():
    """The 95% interval covers the true rate in about 95% of simulated experiments."""
    rng = np.random.default_rng(0)
    p, n, trials = 0.3, 60, 2000
    covered = 0
    for _ in range(trials):
        _, lo, hi = judges.win_rate((rng.random(n) < p).astype(float))
        covered += lo <= p <= hi
    assert 0.93 < covered / trials < 0.97


def test_win_rate_bad_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        judges.win_rate([])
    with pytest.raises(ValueError, match=r"outcomes\[1\] = 0.7"):
        judges.win_rate([1, 0.7])
    with pytest.raises(ValueError, match="confidence"):
        judges.win_rate([1, 0], confidence=1.0)
