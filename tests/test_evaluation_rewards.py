"""Rewards: VADER on sentences of known polarity, a tiny local HF classifier, implicit reward."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch  # the test extra installs it (the classifier reward's [eval] extra)
import transformers

from dpo_jax.data.synthetic import build_char_tokenizer
from dpo_jax.evaluation import rewards

POSITIVE = [
    "I love this movie, it is wonderful and the acting is great!",
    "What a beautiful, happy ending. Highly recommended.",
]
NEGATIVE = [
    "This was a terrible, boring film. I hated it.",
    "Awful plot, horrible acting, a complete waste of time.",
]
NEUTRAL = ["The film is 120 minutes long.", "It was released in 1999."]


# --------------------------------------------------------------------------------------------
# VADER
# --------------------------------------------------------------------------------------------


def test_vader_known_polarity():
    vader = rewards.VaderSentiment()
    texts = POSITIVE + NEGATIVE + NEUTRAL
    r = vader([""] * len(texts), texts)
    assert r.shape == (6,) and r.dtype == np.float64
    assert (r[:2] > 0.5).all(), r
    assert (r[2:4] < -0.5).all(), r
    np.testing.assert_allclose(r[4:], 0.0, atol=0.05)
    assert (np.abs(r) <= 1).all()


def test_vader_with_prompt_scores_the_whole_text():
    prompt = ["This movie was awful and I hated it. "]
    completion = ["The end."]
    assert rewards.VaderSentiment()(prompt, completion)[0] == pytest.approx(0.0, abs=0.05)
    assert rewards.VaderSentiment(with_prompt=True)(prompt, completion)[0] < -0.5
    # Negation flips a lexicon word's valence: VADER is more than a word count.
    vader = rewards.VaderSentiment()
    good, not_good = vader(["", ""], ["The movie is good.", "The movie is not good."])
    assert good > 0.3 and not_good < -0.3


@pytest.mark.parametrize(
    "prompts, completions, error, match",
    [
        ([], [], ValueError, "empty"),
        (["a", "b"], ["x"], ValueError, "2 prompts but 1 completions"),
        ("a", "b", TypeError, "not a str"),
        (["a"], [None], TypeError, r"completions\[0\] is NoneType"),
    ],
)
def test_bad_text_inputs(prompts, completions, error, match):
    with pytest.raises(error, match=match):
        rewards.VaderSentiment()(prompts, completions)


# --------------------------------------------------------------------------------------------
# Hugging Face classifiers (tiny random ones saved by the test, with the repo's char tokenizer)
# --------------------------------------------------------------------------------------------


def _gpt2_config(**kw):
    return transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=100, **kw
    )


@pytest.fixture(scope="module")
def classifier_dirs(tmp_path_factory):
    """{name: directory}: 2-class GPT-2 (NEGATIVE/POSITIVE), 1-logit Llama, an LM without a
    head, and a classifier config whose checkpoint lacks the head weights."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("classifiers")
    dirs = {}

    def save(name, model):
        path = os.fspath(root / name)
        model.save_pretrained(path)
        build_char_tokenizer(path)
        dirs[name] = path

    two = _gpt2_config(num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                       label2id={"NEGATIVE": 0, "POSITIVE": 1}, pad_token_id=0)  # fmt: skip
    model = transformers.GPT2ForSequenceClassification(two)
    with torch.no_grad():  # a zero-initialised head would give identical logits for all texts
        model.score.weight.normal_(0, 1.0)
    save("gpt2_two", model)
    llama = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        num_labels=1, pad_token_id=0,
    )  # fmt: skip
    save("llama_scalar", transformers.LlamaForSequenceClassification(llama))
    save("lm_only", transformers.GPT2LMHeadModel(_gpt2_config()))
    save("headless", transformers.GPT2LMHeadModel(_gpt2_config()))
    config_path = os.path.join(dirs["headless"], "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["architectures"] = ["GPT2ForSequenceClassification"]
    with open(config_path, "w") as f:
        json.dump(config, f)
    return dirs


TEXTS = ["good", "a much longer text with many characters in it", "bad!", "", "xyz " * 5]


def _torch_logits(path, texts):
    """One text at a time, no padding: what the classifier says about each text."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return np.stack(
            [model(**tok(t, return_tensors="pt")).logits[0].numpy() for t in texts]
        ).astype(np.float64)


def test_hf_two_class_scores_match_per_text_logits(classifier_dirs):
    path = classifier_dirs["gpt2_two"]
    z = _torch_logits(path, TEXTS)
    assert np.ptp(z[:, 1] - z[:, 0]) > 1e-3  # the texts really get different scores
    # batch_size 2 with length sorting: rows are padded and reordered, results must not be.
    reward = rewards.HFClassifierReward(path, label="POSITIVE", batch_size=2)
    prompts = [""] * len(TEXTS)
    np.testing.assert_allclose(reward(prompts, TEXTS), z[:, 1] - z[:, 0], atol=1e-5)
    log_p = z - np.logaddexp(z[:, :1], z[:, 1:])
    by_index = rewards.HFClassifierReward(path, label=0, score="log_prob", batch_size=3)
    np.testing.assert_allclose(by_index(prompts, TEXTS), log_p[:, 0], atol=1e-5)
    prob = rewards.HFClassifierReward(path, label="POSITIVE", score="prob")
    np.testing.assert_allclose(prob(prompts, TEXTS), np.exp(log_p[:, 1]), atol=1e-6)
    logit = rewards.HFClassifierReward(path, label="NEGATIVE", score="logit")
    np.testing.assert_allclose(logit(prompts, TEXTS), z[:, 0], atol=1e-5)


def test_hf_scalar_head_and_with_prompt(classifier_dirs):
    path = classifier_dirs["llama_scalar"]
    reward = rewards.HFClassifierReward(path, batch_size=2, with_prompt=True)
    prompts = ["ab", "", "q: ", "x", "1"]
    got = reward(prompts, TEXTS)
    want = _torch_logits(path, [p + t for p, t in zip(prompts, TEXTS, strict=True)])[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    completion_only = rewards.HFClassifierReward(path)(prompts, TEXTS)
    assert not np.allclose(completion_only, got)
    with pytest.raises(ValueError, match="scalar .*no label 'POSITIVE'"):
        rewards.HFClassifierReward(path, label="POSITIVE")


def test_hf_label_errors(classifier_dirs):
    path = classifier_dirs["gpt2_two"]
    with pytest.raises(ValueError, match=r"2 classes \['NEGATIVE', 'POSITIVE'\]: set label="):
        rewards.HFClassifierReward(path)
    with pytest.raises(ValueError, match="unknown label 'HAPPY'"):
        rewards.HFClassifierReward(path, label="HAPPY")
    with pytest.raises(ValueError, match=r"label index 2 outside \[0, 2\)"):
        rewards.HFClassifierReward(path, label=2)
    with pytest.raises(ValueError, match="score='margin'"):
        rewards.HFClassifierReward(path, label=1, score="margin")


def test_hf_not_a_classifier_names_the_directory(classifier_dirs, tmp_path):
    lm_only = classifier_dirs["lm_only"]
    with pytest.raises(ValueError, match=f"{lm_only}.*GPT2LMHeadModel.*no classification head"):
        rewards.HFClassifierReward(lm_only)
    headless = classifier_dirs["headless"]
    with pytest.raises(ValueError, match=f"{headless}.*no classification head.*score.weight"):
        rewards.HFClassifierReward(headless, label=1)
    with pytest.raises(ValueError, match=f"{tmp_path}.*config.json not found"):
        rewards.HFClassifierReward(tmp_path)


def test_hf_batch_of_bad_inputs(classifier_dirs):
    reward = rewards.HFClassifierReward(classifier_dirs["gpt2_two"], label=1)
    with pytest.raises(ValueError, match="HFClassifierReward: empty"):
        reward([], [])


# --------------------------------------------------------------------------------------------
# Implicit reward
# --------------------------------------------------------------------------------------------


def test_implicit_reward():
    r = rewards.implicit_reward([-3.0, -10.0], [-4.0, -8.0], beta=0.5)
    np.testing.assert_allclose(r, [0.5, -1.0])
    with pytest.raises(ValueError, match="one shape"):
        rewards.implicit_reward([-1.0, -2.0], [-1.0], beta=0.1)
    with pytest.raises(ValueError, match="non-finite"):
        rewards.implicit_reward([np.nan], [-1.0], beta=0.1)
    with pytest.raises(ValueError, match="empty"):
        rewards.implicit_reward([], [], beta=0.1)
