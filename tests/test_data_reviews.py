"""Tests for the generated movie-review corpus and its byte-level BPE tokenizer."""

import collections
import json
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_jax.data import reviews, sources
from dpo_jax.data.tokenize import TokenizeConfig, load_tokenizer, tokenize_sequence
from dpo_jax.train import inputs
from dpo_jax.train.defaults import base_config


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+", text)


@pytest.fixture(scope="module")
def sample():
    return reviews.generate_reviews(3000, seed=0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, sample):
    path = tmp_path_factory.mktemp("reviews") / "tokenizer"
    reviews.write_review_tokenizer(path, [r.text for r in sample[:500]], vocab_size=700)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_same_seed_same_reviews_and_different_seed_different_reviews():
    a = reviews.generate_reviews(100, seed=5)
    assert a == reviews.generate_reviews(100, seed=5)
    assert [r.text for r in a] != [r.text for r in reviews.generate_reviews(100, seed=6)]
    assert reviews.generate_reviews(150, seed=5)[:100] == a  # n does not change earlier ones
    with pytest.raises(ValueError, match="num_reviews"):
        reviews.generate_reviews(-1, seed=0)


def test_reviews_are_plain_ascii_with_2_to_6_sentences_and_tone_from_rating(sample):
    tones = collections.Counter()
    for r in sample:
        assert r.text.isascii() and r.text.isprintable(), r.text
        assert r.text == r.text.strip() and "  " not in r.text, r.text
        assert 2 <= len(_sentences(r.text)) <= 6, r.text
        # Capitalised (or a rating such as "8/10."), except for the few reviewers who write
        # all in lowercase.
        first = r.text.lstrip('"')[0]
        assert first.isupper() or first.isdigit() or r.text.islower(), r.text
        assert r.text[-1] in ".!?", r.text
        assert 1 <= r.rating <= 10
        assert r.tone == ("negative" if r.rating <= 4 else "mixed" if r.rating <= 6 else "positive")
        tones[r.tone] += 1
    assert set(tones) == set(reviews.TONES)
    assert min(tones.values()) > 0.1 * len(sample)  # every tone is common


def test_variety_is_not_a_template_with_sentiment_words_swapped(sample):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    sentences = [s for r in sample for s in _sentences(r.text)]
    assert len(set(sentences)) > 0.8 * len(sentences) > 8000
    words = collections.Counter(w for s in sentences for w in re.findall(r"[a-z'-]+", s.lower()))
    assert len(words) > 1000
    # Blank out every word VADER scores: what is left (the frames, subjects, names, plot)
    # must still be thousands of distinct sentences, not a handful of templates.
    lexicon = SentimentIntensityAnalyzer().lexicon

    def skeleton(s):
        return " ".join("_" if w.lower().strip(".,;!?") in lexicon else w for w in s.split())

    assert len({skeleton(s) for s in sentences}) > 0.5 * len(set(sentences))
    # No sentence dominates (the commonest ones are short recommendations and ratings).
    assert collections.Counter(sentences).most_common(1)[0][1] < 0.01 * len(sentences)


def test_vader_scores_follow_the_tone_and_spread_over_the_range(sample):
    from dpo_jax.evaluation.rewards import VaderSentiment

    subset = sample[:1500]
    scores = VaderSentiment()([""] * len(subset), [r.text for r in subset])
    tones = np.array([r.tone for r in subset])
    mean = {t: scores[tones == t].mean() for t in reviews.TONES}
    # VADER leans positive (it misreads "do not bother", "the only saving grace is ..."),
    # so negative reviews sit closer to 0 than positive ones; the gap is what matters.
    assert mean["positive"] > 0.3 and mean["negative"] < 0, mean
    assert mean["positive"] - mean["negative"] > 0.45, mean
    assert mean["negative"] + 0.1 < mean["mixed"] < mean["positive"] - 0.1, mean
    ratings = np.array([r.rating for r in subset])
    assert np.corrcoef(ratings, scores)[0, 1] > 0.4
    # Spread over [-1, 1], not piled at +-1 (VADER saturates on long, one-sided texts).
    counts, _ = np.histogram(scores, bins=10, range=(-1, 1))
    assert counts.min() > 0.02 * len(subset) and counts.max() < 0.3 * len(subset), counts
    assert (np.abs(scores) > 0.95).mean() < 0.15


def test_tokenizer_loads_offline_with_llama_style_specials(tokenizer_dir, tokenizer, sample):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert len(auto) == len(tokenizer) == 700
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    assert tokenizer.unk_token_id == 3
    ids = tokenizer("The acting is superb.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    # BPE merges frequent words: far fewer tokens than characters.
    texts = [r.text for r in sample[-100:]]
    num_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert sum(map(len, texts)) / num_tokens > 2


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), cut=st.floats(0, 1))
def test_tokenizer_round_trips_generated_reviews_at_any_token_boundary(tokenizer, seed, cut):
    # Held-out reviews (the tokenizer saw seed 0's first 500): decoding gives the text back,
    # also when the ids are split in two (a prompt prefix and its continuation).
    text = reviews.generate_reviews(1, seed)[0].text
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    plain = ids[1:]
    k = round(cut * len(plain))
    prefix, rest = tokenizer.decode(plain[:k]), tokenizer.decode(plain[k:])
    assert prefix + rest == text
    # Encoding the two texts apart gives the same ids: a prompt tokenized alone and its
    # completion tokenized alone are the review's own tokens (no merge across the cut).
    encode = tokenizer.encode
    assert (
        encode(prefix, add_special_tokens=False) + encode(rest, add_special_tokens=False) == plain
    )


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80))
def test_tokenizer_round_trips_any_ascii_text(tokenizer, text):
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_training_is_deterministic(tmp_path, sample):
    texts = [r.text for r in sample[:300]]
    a = reviews.write_review_tokenizer(tmp_path / "a", texts, vocab_size=500)
    b = reviews.write_review_tokenizer(tmp_path / "b", texts, vocab_size=500)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and "tokenizer.json" in names
    for name in names:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    with pytest.raises(ValueError, match="vocab_size"):
        reviews.write_review_tokenizer(tmp_path / "c", texts, vocab_size=100)


def _files(directory):
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def test_corpus_reads_through_the_sft_path_and_reruns_are_identical(tmp_path):
    corpus = reviews.write_review_corpus(tmp_path / "a", num_train=120, num_test=30, seed=1)
    tokenizer = load_tokenizer(corpus.tokenizer_path)
    config = TokenizeConfig(max_length=256, max_prompt_length=8)
    texts = {}
    for split, path in (("train", corpus.train_path), ("test", corpus.test_path)):
        examples = list(sources.iter_examples(path, kind="sft"))
        assert len(examples) == {"train": 120, "test": 30}[split]
        for example, _ in examples:
            assert example.prompt == ""
            seq = tokenize_sequence(example, tokenizer, config)
            assert seq.prompt_ids == [tokenizer.bos_token_id]
            assert seq.completion_ids[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(seq.completion_ids[:-1]) == example.completion
        texts[split] = {e.completion for e, _ in examples}
    assert not texts["train"] & texts["test"]  # the test split is held out
    with open(corpus.train_path) as f:
        first = json.loads(f.readline())
    assert set(first) == {"prompt", "completion", "rating", "tone"}

    # The SFT stage's own reader (an SFT-only run) takes the files as they are.
    config = base_config()
    config.stages = ("sft",)
    config.data.train_files = (corpus.train_path,)
    config.data.tokenizer = corpus.tokenizer_path
    config.data.max_length = 256
    config.data.max_prompt_length = 8
    splits = inputs.load_splits(config, str(tmp_path / "workdir"))
    assert len(splits.sequences) == 120 and not splits.bad_records and not splits.tokenize_events

    before = _files(tmp_path / "a")
    mtimes = {p: os.stat(tmp_path / "a" / p).st_mtime_ns for p in before}
    assert reviews.write_review_corpus(tmp_path / "a", 120, 30, seed=1) == corpus
    assert {p: os.stat(tmp_path / "a" / p).st_mtime_ns for p in before} == mtimes  # no-op
    reviews.write_review_corpus(tmp_path / "b", 120, 30, seed=1)
    assert _files(tmp_path / "b") == before  # byte-identical from scratch
    # An edited (or half-written) file is noticed and rewritten.
    with open(corpus.test_path, "a") as f:
        f.write('{"prompt": "", "completion": "edited"}\n')
    reviews.write_review_corpus(tmp_path / "a", 120, 30, seed=1)
    assert _files(tmp_path / "a") == before
    with pytest.raises(ValueError, match="num_train"):
        reviews.write_review_corpus(tmp_path / "c", 0, 30, seed=1)
    # Other arguments rewrite the directory.
    reviews.write_review_corpus(tmp_path / "a", 100, 30, seed=1)
    assert len(list(sources.iter_records(corpus.train_path))) == 100
