"""Reward functions: `reward(prompts, completions) -> [N] float64`, one interface.

Every reward here is a callable `reward(prompts: Sequence[str], completions: Sequence[str])
-> np.ndarray [N]` (higher is better), so judges, KL/reward frontiers and the evaluate entry
point take any of them:

  VaderSentiment       the VADER lexicon's compound sentiment in [-1, 1] (offline, no model);
                       the ground truth of our small controlled-sentiment experiment.
  HFClassifierReward   a Hugging Face `AutoModelForSequenceClassification` from a local
                       directory, run by transformers + torch (the `[eval]` extra): the DPO
                       paper's IMDb sentiment classifier (siebert/sentiment-roberta-large-
                       english) or any reward model with a scalar head.
  SubstringCount       occurrences of a fixed substring: a reward any tiny model can move,
                       for tests of RL training (PPO) on toy data.
  implicit_reward      the policy's own DPO reward beta * (log pi(y|x) - log pi_ref(y|x)),
                       from sequence log-prob sums (e.g. `kl.sequence_logps`).

Whether the prompt is part of the scored text is a choice of the experiment: the IMDb task
(the prompt is the start of a review) scores the whole review, a reward model usually sees
the conversation. `with_prompt` selects `prompt + completion` (plain concatenation: include
any separator in the completion or the prompt) or the completion alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from dpo_jax.evaluation.kl import paired_logps

__all__ = [
    "HFClassifierReward",
    "Reward",
    "SubstringCount",
    "VaderSentiment",
    "check_texts",
    "implicit_reward",
]


class Reward(Protocol):
    """`reward(prompts, completions) -> np.ndarray [N]`, higher is better."""

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray: ...


def check_texts(what: str, prompts: Sequence[str], completions: Sequence[str]) -> None:
    """Raises a ValueError naming `what` for empty, mismatched or non-string inputs."""
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError(f"{what}: prompts and completions must be lists of strings, not a str")
    if len(prompts) != len(completions):
        raise ValueError(
            f"{what}: {len(prompts)} prompts but {len(completions)} completions (must match)"
        )
    if not prompts:
        raise ValueError(f"{what}: empty list of prompts/completions")
    for name, texts in (("prompts", prompts), ("completions", completions)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{what}: {name}[{i}] is {type(text).__name__}, not str")


def _texts(prompts, completions, with_prompt: bool) -> list[str]:
    return (
        [p + c for p, c in zip(prompts, completions, strict=True)]
        if with_prompt
        else list(completions)
    )


class VaderSentiment:
    """VADER compound sentiment (Hutto & Gilbert 2014) of each text, in [-1, 1].

    compound = normalised sum of the lexicon valences of the words, after VADER's rules for
    negation, intensifiers, "but" and punctuation: > 0.05 reads as positive, < -0.05 as
    negative. Lexicon only (the `vaderSentiment` package): deterministic, offline, fast.

    Args:
      with_prompt: score `prompt + completion` (True) or the completion alone (False).
    """

    def __init__(self, *, with_prompt: bool = False):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.with_prompt = with_prompt
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        check_texts("VaderSentiment", prompts, completions)
        texts = _texts(prompts, completions, self.with_prompt)
        return np.array([self._analyzer.polarity_scores(t)["compound"] for t in texts])


class SubstringCount:
    """Non-overlapping occurrences of `target` in each text (`str.count`), as float64.

    Args:
      target: a non-empty substring, e.g. "a".
      with_prompt: count in `prompt + completion` (True) or in the completion alone (False).
    """

    def __init__(self, target: str, *, with_prompt: bool = False):
        if not isinstance(target, str) or not target:
            raise ValueError(f"SubstringCount: target must be a non-empty string, got {target!r}")
        self.target, self.with_prompt = target, with_prompt

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        check_texts("SubstringCount", prompts, completions)
        texts = _texts(prompts, completions, self.with_prompt)
        return np.array([t.count(self.target) for t in texts], np.float64)


SCORES = ("log_odds", "log_prob", "prob", "logit")


class HFClassifierReward:
    """A local Hugging Face sequence classifier (reward model) as a reward.

    The classifier maps a text to logits `z [K]`. The reward is, for K = 1 (a scalar reward
    head, as in most reward models), `z[0]`; for K >= 2 it depends on `label` (the class
    whose evidence is the reward: a name from the config's `id2label`, e.g. "POSITIVE" for
    siebert/sentiment-roberta-large-english, or an index) and `score`:
      log_odds  log p(label) - log(1 - p(label)) = z[label] - logsumexp(z[others]); for two
                classes the logit difference z[label] - z[other] (the default);
      log_prob  log softmax(z)[label];
      prob      softmax(z)[label];
      logit     z[label] (not comparable across classifiers: logits have a free offset).

    Texts are tokenized by the directory's own tokenizer, truncated to `max_length` tokens
    (default: the smaller of the tokenizer's and the model's limit), sorted by length and
    run in batches of `batch_size` under `torch.inference_mode` in float32 on `device`.
    Remote code is never run (`trust_remote_code=False`). torch is imported here, not with
    the package: install it with `pip install -e ".[eval]"`.

    Raises ValueError naming the directory when it has no config.json, when its config lists
    only architectures that are not sequence classifiers, or when its checkpoint lacks the
    classification head's weights (transformers would silently initialise them randomly).
    """

    def __init__(
        self,
        path: str,
        *,
        label: str | int | None = None,
        score: str = "log_odds",
        with_prompt: bool = False,
        batch_size: int = 16,
        max_length: int | None = None,
        device: str = "cpu",
    ):
        path = os.fspath(path)
        where = f"HFClassifierReward({path!r})"
        if score not in SCORES:
            raise ValueError(f"{where}: score={score!r}; expected one of {SCORES}")
        if batch_size < 1:
            raise ValueError(f"{where}: batch_size must be >= 1, got {batch_size}")
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"{where}: {config_path} not found (need a local HF directory)")
        with open(config_path) as f:
            architectures = json.load(f).get("architectures") or []
        if architectures and not any(
            a.endswith("ForSequenceClassification") for a in architectures
        ):
            raise ValueError(
                f"{where}: not a sequence classifier: config.json lists architectures "
                f"{architectures}, none a *ForSequenceClassification (no classification head)"
            )
        try:
            import torch
        except ImportError as err:
            raise ImportError(
                f'{where} needs torch: pip install -e ".[eval]" -c constraints.txt'
            ) from err
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=False, output_loading_info=True, dtype=torch.float32
        )
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            raise ValueError(
                f"{where}: the checkpoint has no classification head: weights {missing[:5]} "
                "are missing (transformers would initialise them randomly)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        if self.tokenizer.pad_token is None:
            # Batches need padding; decoder classifiers (GPT-2, Llama) also use pad_token_id
            # to find each row's last real token, so the model must know the same id.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(device).eval()
        self.torch, self.device = torch, device
        self.num_labels = int(model.config.num_labels)
        self.label_index = self._label_index(where, label, model.config.id2label)
        self.score, self.with_prompt, self.batch_size = score, with_prompt, batch_size
        limits = [getattr(model.config, "max_position_embeddings", None)]
        limits.append(getattr(self.tokenizer, "model_max_length", None))
        if max_length is None:
            # Tokenizers without a limit report a huge sentinel (int(1e30)); RoBERTa-style
            # position tables hold 2 offset slots, which the tokenizer's limit accounts for.
            valid = [int(x) for x in limits if x is not None and 0 < x < 1_000_000]
            max_length = min(valid) if valid else None
        self.max_length = max_length

    def _label_index(self, where, label, id2label) -> int | None:
        if self.num_labels == 1:
            if label not in (None, 0):
                raise ValueError(f"{where}: a scalar (1-logit) head has no label {label!r}")
            return None
        names = {str(v): int(k) for k, v in (id2label or {}).items()}
        if label is None:
            raise ValueError(
                f"{where}: {self.num_labels} classes {sorted(names, key=names.get)}: set label= "
                "to the class whose score is the reward"
            )
        if isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < self.num_labels:
                raise ValueError(f"{where}: label index {label} outside [0, {self.num_labels})")
            return label
        if label not in names:
            raise ValueError(f"{where}: unknown label {label!r}; id2label has {sorted(names)}")
        return names[label]

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Classifier logits [N, K] float32 of `texts`, in input order."""
        torch = self.torch
        lengths = [len(t) for t in texts]
        # Similar lengths in one batch waste less compute on padding.
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), self.num_labels), np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                out[idx] = self.model(**enc).logits.float().cpu().numpy()
        return out

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        check_texts("HFClassifierReward", prompts, completions)
        z = self.logits(_texts(prompts, completions, self.with_prompt)).astype(np.float64)
        if self.label_index is None:
            return z[:, 0]
        k = self.label_index
        log_probs = z - _logsumexp(z, axis=-1)[:, None]
        if self.score == "logit":
            return z[:, k]
        if self.score == "log_prob":
            return log_probs[:, k]
        if self.score == "prob":
            return np.exp(log_probs[:, k])
        others = np.delete(z, k, axis=-1)
        return z[:, k] - _logsumexp(others, axis=-1)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def implicit_reward(policy_logps, ref_logps, beta: float) -> np.ndarray:
    """DPO's implicit reward of completions (Rafailov et al. 2023, arXiv 2305.18290, Eq. 5).

    `r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))`, the reward under which the policy is
    optimal for the KL-constrained objective (up to a per-prompt constant beta log Z(x), so
    compare it between completions of one prompt). `beta` is the training run's KL-penalty
    strength.

    Args:
      policy_logps: [N] sequence log-prob sums of the completions under the policy.
      ref_logps: [N] the same under the reference.
    Returns:
      [N] float64.
    """
    policy_logps, ref_logps = paired_logps("implicit_reward", policy_logps, ref_logps)
    return beta * (policy_logps - ref_logps)
