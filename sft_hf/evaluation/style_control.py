"""Style-controlled Bradley-Terry ratings: Chatbot Arena's style control (LMSYS blog, "Does style matter?";
lm-sys/FastChat fastchat/serve/monitor/rating_systems.py, compute_style_control).

People prefer longer, more formatted answers, so a model can climb the leaderboard on style alone. Style control
fits the Bradley-Terry model with per-battle style features next to the model terms:

    logit P(A beats B) = ln 10 · (r_A - r_B) + Σ_k β_k · f_k

with four features, each the difference between the two answers normalised by their sum, (a - b) / (a + b + 1):
answer length, markdown headers, list items, and bold spans (counted with FastChat's regular expressions after
code blocks are removed), each divided by its standard deviation over the battles. The style-controlled rating is
r read with every β at 0: how a model would fare against answers styled like its own. β_k says how much that style
element moves the vote (logit per standard deviation of the normalised difference).

As FastChat's: soft labels (a tie is half a win), an L2 penalty of 0.5 on every coefficient (its `reg`), ratings
400 · r shifted to a mean of 1000, 95 % intervals from refits on the battles resampled with replacement. Unlike
FastChat the features are not centred, so 0 means "both answers alike" (FastChat subtracts the mean difference,
which is near 0 anyway when sides are drawn at random); length is counted in characters (FastChat: tokens; the
normalised difference hardly depends on the unit). A feature that never differs (no bold anywhere) is left out.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from sft_hf.errors import DataError

FEATURES = ("length", "headers", "lists", "bold")
REGULARISATION = 0.5  # FastChat's reg for the fit over battles (equal to scikit-learn's C=1 over doubled rows)
CODE_BLOCK = re.compile(r"```([^`]*)```")
PATTERNS = {  # FastChat add_markdown_info.py: headers h1-h6, ordered and unordered list items, ** and __ bold
    "headers": [re.compile(r"^#{%d}\s" % n, re.MULTILINE) for n in range(1, 7)],
    "lists": [re.compile(r"^\s*\d+\.\s", re.MULTILINE), re.compile(r"^\s*[-*+]\s", re.MULTILINE)],
    "bold": [re.compile(r"\*\*[^*\n]+\*\*"), re.compile(r"__[^_\n]+__")],
}
# Chatbot Arena's own battle files carry the counts (conv_metadata) instead of the answers
METADATA_KEYS = {"length": "sum_assistant_{}_tokens", "headers": "header_count_{}", "lists": "list_count_{}",
                 "bold": "bold_count_{}"}


def style_counts(text: str) -> dict[str, int]:
    """Length in characters and the markdown counts of one answer (code blocks removed first, as FastChat does)."""
    prose = CODE_BLOCK.sub("", text)
    counts = {name: sum(len(p.findall(prose)) for p in patterns) for name, patterns in PATTERNS.items()}
    return {"length": len(text), **counts}


def answer_text(battle: dict, side: str) -> str | None:
    """The assistant turns of one side: conversation_a/b (this arena's export, Chatbot Arena's conversations), else
    response_a/b; None when the record has neither."""
    conversation = battle.get(f"conversation_{side}")
    if isinstance(conversation, list):
        return "\n".join(str(turn.get("content", "")) for turn in conversation
                         if isinstance(turn, dict) and turn.get("role") == "assistant")
    response = battle.get(f"response_{side}")
    return response if isinstance(response, str) else None


def battle_counts(battle: dict, index: int) -> tuple[dict, dict]:
    """The style counts of both answers of one battle, from its texts or from Chatbot Arena's conv_metadata."""
    texts = answer_text(battle, "a"), answer_text(battle, "b")
    if None not in texts:
        return style_counts(texts[0]), style_counts(texts[1])
    meta = battle.get("conv_metadata")
    if isinstance(meta, dict):
        def count(key):
            value = meta.get(key)
            return sum(value.values()) if isinstance(value, dict) else value

        sides = [{name: count(key.format(side)) for name, key in METADATA_KEYS.items()} for side in "ab"]
        if all(isinstance(v, (int, float)) for side in sides for v in side.values()):
            return sides[0], sides[1]
    raise DataError(f"battle {index} ({battle.get('question_id', 'no question_id')}): style control needs both "
                    "answers (conversation_a/b or response_a/b, as `sft-hf arena --export` writes) or Chatbot "
                    "Arena's conv_metadata counts")


def style_features(battles: list[dict]) -> tuple[np.ndarray, list[str]]:
    """(battles, features) normalised differences (a - b) / (a + b + 1), each divided by its standard deviation,
    and the names of the features kept (one that is the same in every battle says nothing and is left out)."""
    counts = [battle_counts(b, k) for k, b in enumerate(battles)]
    a = np.array([[c[0][f] for f in FEATURES] for c in counts], dtype=float).reshape(-1, len(FEATURES))
    b = np.array([[c[1][f] for f in FEATURES] for c in counts], dtype=float).reshape(-1, len(FEATURES))
    difference = (a - b) / (a + b + 1)
    spread = difference.std(axis=0)
    kept = spread > 1e-12
    return difference[:, kept] / spread[kept], [f for f, keep in zip(FEATURES, kept) if keep]


@dataclass
class StyleControlled:
    models: list[str]
    ratings: np.ndarray  # per model, style terms at 0
    lower: np.ndarray  # 95 % bootstrap interval
    upper: np.ndarray
    coefficients: dict[str, tuple[float, float, float] | None]  # feature → (β, lower, upper); None: left out
    rounds: int
    seed: int
    samples: np.ndarray  # (rounds, models) bootstrap ratings


def fit_style_controlled(battles: list[dict], rounds: int = 1000, seed: int = 0,
                         reg: float = REGULARISATION) -> StyleControlled:
    """Style-controlled ratings of every model in `battles` (model_a, model_b, winner and both answers), with
    bootstrap intervals for the ratings and the style coefficients."""
    from sft_hf.evaluation.arena.ratings import BASE, fit_logistic_batches, to_ratings
    from sft_hf.evaluation.win_rate import CONFIDENCE, bootstrap_interval

    models = sorted({b[key] for b in battles for key in ("model_a", "model_b")})
    index = {m: i for i, m in enumerate(models)}
    n = len(models)
    features, kept = style_features(battles)
    X = np.zeros((len(battles), n + len(kept)))
    rows = np.arange(len(battles))
    X[rows, [index[b["model_a"]] for b in battles]] += math.log(BASE)
    X[rows, [index[b["model_b"]] for b in battles]] -= math.log(BASE)
    X[:, n:] = features
    y = np.array([{"model_a": 1.0, "model_b": 0.0}.get(b["winner"], 0.5) for b in battles])
    # battles alike in every column (the same prompt, pair, sides and outcome) are one row with a count
    unique, counts = np.unique(np.column_stack([X, y]), axis=0, return_counts=True)
    X, y = unique[:, :-1], unique[:, -1]
    fits = [counts[None, :].astype(float)]
    if rounds:
        rng = np.random.default_rng(seed)
        fits.append(rng.multinomial(len(battles), counts / counts.sum(), size=rounds).astype(float))
    theta = fit_logistic_batches(X, y, np.concatenate(fits), reg)
    ratings, betas = to_ratings(theta[:, :n]), theta[:, n:]
    samples = ratings[1:] if rounds else ratings
    lower, upper = bootstrap_interval(samples, CONFIDENCE, axis=0)
    beta_low, beta_high = bootstrap_interval(betas[1:] if rounds else betas, CONFIDENCE, axis=0)
    coefficients = {f: None for f in FEATURES}
    for k, name in enumerate(kept):
        coefficients[name] = (float(betas[0, k]), float(beta_low[k]), float(beta_high[k]))
    return StyleControlled(models, ratings[0], lower, upper, coefficients, rounds, seed, samples)


def format_coefficients(style: StyleControlled) -> str:
    """"length +0.84 (0.71 to 0.98), headers +0.10 (...), lists -, bold -" for a report line."""
    parts = []
    for name, value in style.coefficients.items():
        parts.append(f"{name} -" if value is None else f"{name} {value[0]:+.2f} ({value[1]:+.2f} to {value[2]:+.2f})")
    return ", ".join(parts)
