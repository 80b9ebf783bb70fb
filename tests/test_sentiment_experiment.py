"""experiments/sentiment: the controlled-sentiment pipeline end to end in its `tiny` mode, its
resume, and the pure pieces (prefixes, ordered pairs, Best-of-N, the KL-bucket table)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

from dpo_jax.data.tokenize import load_tokenizer
from dpo_jax.train import inputs
from dpo_jax.train.defaults import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sentiment = _module("sentiment_run", "experiments/sentiment/run.py")
frontier = _module("sentiment_frontier", "experiments/sentiment/frontier.py")
configs = _module("sentiment_config", "configs/sentiment.py")


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _gz_jsonl(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------
# The whole pipeline, tiny
# ----------------------------------------------------------------------------------------


def test_tiny_pipeline_writes_the_frontier_and_a_rerun_skips_finished_stages(tmp_path):
    config = configs.get_config("tiny")
    workdir, results = str(tmp_path / "work"), str(tmp_path / "results")
    timings = sentiment.run(config, workdir, results)
    assert list(timings) == list(sentiment.STAGES)

    rows = _csv(os.path.join(results, "frontier.csv"))
    assert tuple(rows[0]) == sentiment.CSV_COLUMNS
    t, e = config.train, config.eval
    steps = list(range(t.eval_every, t.steps + 1, t.eval_every))
    want = [("sft", 0)] + [(m["run"], s) for m in config.methods for s in steps]
    want += [(f"best_of_{n}", 0) for n in e.best_of_n]
    assert sentiment.learned_reward_run(config) is not None  # tiny has a learned-reward PPO run
    want += [(f"best_of_{n}_rm", 0) for n in e.best_of_n]
    assert [(r["run"], int(r["step"])) for r in rows] == want
    for r in rows:
        assert 0.0 <= float(r["reward"]) <= 1.0 and math.isfinite(float(r["kl"]))
    sft = rows[0]
    # The SFT model against itself: identical log-probs up to float32 rounding.
    assert sft["method"] == "SFT" and abs(float(sft["kl"])) < 1e-3
    k = len(e.best_of_n)
    for r, n in zip(rows[-2 * k : -k], e.best_of_n, strict=True):
        assert r["method"] == sentiment.BEST_OF_N
        assert float(r["kl"]) == pytest.approx(math.log(n) - (n - 1) / n)
        # Best-of-N from SFT's own samples is never below the mean of those samples.
        assert float(r["reward"]) >= float(sft["reward"]) - 3 * float(sft["reward_stderr"]) - 1e-9
    # The paper's Best-of-N: the same samples, the reward model's highest score picks.
    bon = _gz_jsonl(os.path.join(results, "samples", "best_of_n.jsonl.gz"))
    scores = _gz_jsonl(os.path.join(results, "samples", "best_of_n_rm_scores.jsonl.gz"))
    assert [(s["prompt_index"], s["sample_index"]) for s in scores] == [
        (s["prompt_index"], s["sample_index"]) for s in bon
    ]
    assert all(math.isfinite(s["rm_score"]) for s in scores)
    rewards = np.array([s["reward"] for s in bon]).reshape(e.best_of_n_prompts, -1)
    picks = np.array([s["rm_score"] for s in scores]).reshape(rewards.shape)
    for r, n in zip(rows[-k:], e.best_of_n, strict=True):
        assert r["method"] == sentiment.BEST_OF_N_RM
        assert float(r["kl"]) == pytest.approx(math.log(n) - (n - 1) / n)
        groups = picks.reshape(len(picks), -1, n).argmax(-1)
        chosen = np.take_along_axis(rewards.reshape(len(rewards), -1, n), groups[..., None], -1)
        assert float(r["reward"]) == pytest.approx(chosen.mean())

    # Every number has its samples; the rewards recompute from them.
    for m in config.methods:
        samples = _gz_jsonl(os.path.join(results, "samples", m["run"] + ".jsonl.gz"))
        assert len(samples) == len(steps) * e.num_prompts * e.samples_per_prompt
        for step in steps:
            mine = [s["reward"] for s in samples if s["checkpoint"] == f"{m['run']}@{step}"]
            row = next(r for r in rows if r["run"] == m["run"] and int(r["step"]) == step)
            assert float(row["reward"]) == pytest.approx(np.mean(mine))
    reward = sentiment.UnitVader()
    sample = samples[0]
    assert reward([sample["prompt"]], [sample["completion"]])[0] == pytest.approx(sample["reward"])

    # Pairs: chosen has the higher reward; every pair's prompt is a training prefix.
    pairs = sentiment.read_jsonl(os.path.join(workdir, "pairs", "train.jsonl"))
    prefixes = {
        r["prompt"]
        for r in sentiment.read_jsonl(os.path.join(workdir, "corpus", "prefixes_train.jsonl"))
    }
    assert pairs and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert {p["prompt"] for p in pairs} <= prefixes

    table = open(os.path.join(results, "table.md")).read()
    for method in ("SFT", "DPO", "Preferred-FT", "PPO", sentiment.BEST_OF_N):
        assert f"| {method} |" in table
    assert os.path.getsize(os.path.join(results, "frontier.png")) > 10_000

    # Resume: everything is done, only the report is redrawn, to the same CSV.
    before = open(os.path.join(results, "frontier.csv")).read()
    assert list(sentiment.run(config, workdir, results)) == ["report"]
    assert open(os.path.join(results, "frontier.csv")).read() == before
    # One stage alone needs its predecessors, and a changed config is refused.
    with pytest.raises(ValueError, match="needs stage 'corpus' first"):
        sentiment.run(config, str(tmp_path / "fresh"), stage="pairs")
    with config.unlocked():
        config.train.steps = 6
    with pytest.raises(ValueError, match="train.steps"):
        sentiment.run(config, workdir, results)


# ----------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------


def test_ordered_pairs_put_the_higher_reward_first_and_drop_ties_and_empty_samples():
    def s(text, reward):
        return {"completion": text, "reward": reward}

    pairs, counts = sentiment.ordered_pairs(
        "P", [s(" a", 0.1), s(" b", 0.9), s(" c", 0.5), s(" d", 0.7)]
    )
    assert len(pairs) == 6 and counts == {"empty": 0, "ties": 0}
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        (" b", " a"),
        (" c", " a"),
        (" d", " a"),
        (" b", " c"),
        (" b", " d"),
        (" d", " c"),
    }
    pairs, counts = sentiment.ordered_pairs(
        "P", [s(" a", 0.5), s(" b", 0.5), s("  ", 0.9), s(" c", 0.2)]
    )
    assert counts == {"empty": 1, "ties": 1}
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(" a", " c"), (" b", " c")]


def test_best_of_n_takes_the_best_of_disjoint_groups_with_the_analytic_kl():
    rewards = np.array([[0.1, 0.9, 0.2, 0.3], [0.5, 0.4, 0.6, 0.0]])
    rows = sentiment.best_of_n_rows(rewards, (1, 2, 4))
    # N=2: groups (0.1, 0.9), (0.2, 0.3) -> 0.6; (0.5, 0.4), (0.6, 0.0) -> 0.55.
    assert [r["reward"] for r in rows] == pytest.approx([0.375, 0.575, 0.75])
    assert rows[1]["reward_stderr"] == pytest.approx(np.std([0.6, 0.55], ddof=1) / np.sqrt(2))
    assert [r["kl"] for r in rows] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    assert [r["run"] for r in rows] == ["best_of_1", "best_of_2", "best_of_4"]
    # Picked by another score (a reward model's): its best sample's reward counts. Reversed
    # scores pick the worst sample of each group.
    rows = sentiment.best_of_n_rows(rewards, (2, 4), -rewards, sentiment.BEST_OF_N_RM)
    # N=2: (0.1, 0.2) -> 0.15; (0.4, 0.0) -> 0.2. N=4: 0.1; 0.0.
    assert [r["reward"] for r in rows] == pytest.approx([0.175, 0.05])
    assert [r["run"] for r in rows] == ["best_of_2_rm", "best_of_4_rm"]
    assert {r["method"] for r in rows} == {sentiment.BEST_OF_N_RM}
    assert [r["kl"] for r in rows] == pytest.approx([math.log(2) - 0.5, math.log(4) - 0.75])


def test_prefixes_are_2_to_8_tokens_and_prefix_plus_rest_is_the_review(tmp_path):
    from dpo_jax.data import reviews

    texts = [r.text for r in reviews.generate_reviews(40, seed=3)]
    tokenizer = load_tokenizer(reviews.write_review_tokenizer(str(tmp_path / "tok"), texts, 300))
    records = sentiment.review_prefixes(texts, tokenizer, 30, 2, 8, seed=0)
    assert len(records) == 30 and len({r["review"] for r in records}) == 30
    lengths = set()
    for r in records:
        assert r["prompt"] + r["completion"] == texts[r["review"]]
        lengths.add(len(tokenizer.encode(r["prompt"], add_special_tokens=False)))
    assert lengths <= set(range(2, 9)) and len(lengths) > 3
    with pytest.raises(ValueError, match="only 40 of 40 reviews"):
        sentiment.review_prefixes(texts, tokenizer, 41, 2, 8, seed=0)


def test_bucket_table_keeps_each_methods_best_point_per_kl_bucket():
    def row(method, run, step, reward, kl):
        return dict(
            run=run,
            method=method,
            hyperparameter="-",
            step=step,
            reward=reward,
            reward_stderr=0.01,
            kl=kl,
            kl_stderr=0.1,
        )

    rows = [
        row("SFT", "sft", 0, 0.5, -0.001),
        row("DPO", "d", 1, 0.6, 0.7),
        row("DPO", "d", 2, 0.8, 0.9),
        row("DPO", "d", 3, 0.9, 40.0),
    ]
    lines = frontier.bucket_table(rows, (0.0, 0.5, 1.0)).splitlines()
    assert lines[0] == "| method | [0, 0.5) | [0.5, 1) | >= 1 |"
    assert lines[2] == "| SFT | 0.500 +- 0.010 (sft@0) | - | - |"
    assert lines[3] == "| DPO | - | 0.800 +- 0.010 (d@2) | 0.900 +- 0.010 (d@3) |"


def test_dominance_counts_points_with_more_reward_at_less_kl():
    def row(method, reward, kl):
        return dict(
            run="r",
            method=method,
            hyperparameter="-",
            step=1,
            reward=reward,
            reward_stderr=0.0,
            kl=kl,
            kl_stderr=0.0,
        )

    rows = [
        row("DPO", 0.8, 2.0),
        row("DPO", 0.6, 1.0),
        row("Preferred-FT", 0.7, 3.0),
        row("Preferred-FT", 0.9, 0.5),
        row("Unlikelihood", 0.6, 1.0),
        row("SFT", 0.5, 0.0),
    ]
    lines = frontier.dominance_table(rows).splitlines()
    # (0.9, 0.5) dominates both DPO points; (0.8, 2.0) dominates (0.7, 3.0). An equal point
    # does not dominate.
    assert lines[2:] == ["| Preferred-FT | 2 of 2 | 1 of 2 |", "| Unlikelihood | 0 of 2 | 0 of 1 |"]


def test_an_sft_only_run_reads_prompt_completion_records_without_pairs(tmp_path):
    """The SFT stage on plain texts (the experiment's SFT on reviews) needs no pairs."""
    from dpo_jax.data import reviews

    texts = [r.text for r in reviews.generate_reviews(12, seed=0)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": "", "completion": t}) + "\n" for t in texts))
    config = base_config()
    config.stages = ("sft",)
    config.data.train_files = (str(path),)
    config.data.tokenizer = reviews.write_review_tokenizer(str(tmp_path / "tok"), texts, 300)
    splits = inputs.load_splits(config, str(tmp_path))
    assert len(splits.sequences) == 12 and splits.pairs == [] and splits.eval_pairs == []
    tokenizer = splits.tokenizer
    first = splits.sequences[0]
    assert tokenizer.decode(first.completion_ids, skip_special_tokens=True) == texts[0]


# ----------------------------------------------------------------------------------------
# The 'full' configuration's code path, with tiny stand-ins
# ----------------------------------------------------------------------------------------


def _tiny_hf_models(tmp_path, texts):
    """A random 1-layer GPT-2 with a tokenizer trained on `texts`, and a random RoBERTa
    sentiment classifier (NEGATIVE/POSITIVE) with the same tokenizer, saved as the paper's
    gpt2-large and siebert/sentiment-roberta-large-english would be."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    from dpo_jax.data import reviews

    gpt2, classifier = str(tmp_path / "gpt2"), str(tmp_path / "classifier")
    tokenizer = load_tokenizer(reviews.write_review_tokenizer(gpt2, texts, 320))
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=64,
            n_embd=32,
            n_layer=1,
            n_head=2,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(gpt2)
    labels = {0: "NEGATIVE", 1: "POSITIVE"}
    RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=130,
            num_labels=2,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
            pad_token_id=tokenizer.pad_token_id,
            architectures=["RobertaForSequenceClassification"],
        )
    ).save_pretrained(classifier)
    tokenizer.model_max_length = 128  # RoBERTa's position table keeps 2 offset slots
    tokenizer.save_pretrained(classifier)
    return gpt2, classifier


def test_full_configuration_runs_on_imdb_style_parquet_with_a_classifier_reward(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpo_jax.data import reviews
    from dpo_jax.evaluation.rewards import HFClassifierReward

    generated = reviews.generate_reviews(72, seed=5)
    # IMDb's markup: the reader turns each run of <br /> into one space.
    texts = [r.text.replace(". ", ".<br /><br />", 1) for r in generated]
    labels = [int(r.tone == "positive") for r in generated]
    for name, rows in (("train", slice(0, 60)), ("test", slice(60, 72))):
        table = pa.table({"text": texts[rows], "label": labels[rows]})
        pq.write_table(table, str(tmp_path / f"{name}.parquet"))
    gpt2, classifier = _tiny_hf_models(tmp_path, [r.text for r in generated])

    config = configs.get_config("full")
    with config.unlocked():
        config.model.hf_path = gpt2
        config.reward.path = classifier
        config.corpus.train_path = str(tmp_path / "train.parquet")
        config.corpus.test_path = str(tmp_path / "test.parquet")
        configs.shrink_to_tiny(config)
    with pytest.raises(ValueError, match="reward.path"):
        bad = config.copy_and_resolve_references()
        bad.reward.path = ""
        sentiment.run(bad, str(tmp_path / "bad"))

    workdir, results = str(tmp_path / "work"), str(tmp_path / "results")
    sentiment.run(config, workdir, results)
    corpus = sentiment.read_jsonl(os.path.join(workdir, "corpus", "train.jsonl"))
    assert len(corpus) == 60 and not any("<br" in r["completion"] for r in corpus)
    rows = _csv(os.path.join(results, "frontier.csv"))
    assert [r["method"] for r in rows][:2] == ["SFT", "DPO"]
    assert len(rows) == 1 + 2 * len(config.methods) + 2  # SFT, 2 checkpoints a run, Best-of-N
    assert "PPO-GT" in {r["method"] for r in rows}  # PPO on the classifier's reward
    # The reward is the classifier's P(POSITIVE) of prefix + completion.
    reward = HFClassifierReward(classifier, label="POSITIVE", score="prob", with_prompt=True)
    samples = _gz_jsonl(os.path.join(results, "samples", "dpo_beta0.1.jsonl.gz"))[:4]
    got = reward([s["prompt"] for s in samples], [s["completion"] for s in samples])
    assert got == pytest.approx([s["reward"] for s in samples], abs=1e-6)


# ----------------------------------------------------------------------------------------
# The configuration and the final summary
# ----------------------------------------------------------------------------------------


def test_every_variant_loads_locked_and_the_docstring_holds_the_commands():
    source = open(os.path.join(ROOT, "configs", "sentiment.py")).read()
    for size in configs.SIZES:
        config = configs.get_config(size)
        assert config.is_locked and config.size == size
        assert config.methods and all(m["stage"] in ("sft", "dpo", "ppo") for m in config.methods)
        if size != "full":  # full names the local files it needs on the command line
            sentiment.check_inputs(config)
    assert "--config=configs/sentiment.py:small" in source
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "experiments/sentiment/run.py --config=configs/sentiment.py:quick" in readme
    quick = configs.get_config("quick")
    assert [m["method"] for m in quick.methods] == ["DPO"]
    with pytest.raises(ValueError, match="unknown sentiment variant"):
        configs.get_config("huge")


def test_final_summary_reports_each_runs_last_checkpoint_next_to_sft():
    def row(run, method, hparam, step, reward, kl):
        return dict(run=run, method=method, hyperparameter=hparam, step=step, reward=reward,
                    reward_stderr=0.01, kl=kl, kl_stderr=0.1)  # fmt: skip

    rows = [
        row("sft", "SFT", "-", 0, 0.5, 0.0),
        row("dpo_beta0.1", "DPO", "beta=0.1", 40, 0.6, 2.0),
        row("dpo_beta0.1", "DPO", "beta=0.1", 80, 0.7, 4.0),
        row("best_of_4", sentiment.BEST_OF_N, "N=4", 0, 0.9, 0.6),
    ]
    lines = sentiment.final_summary(rows).splitlines()
    assert len(lines) == 3 and lines[1].split()[0] == "SFT"
    assert "DPO beta=0.1" in lines[2] and "step   80" in lines[2] and "0.700" in lines[2]
    assert "Best-of-N" not in "\n".join(lines)
