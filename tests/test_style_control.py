"""Style-controlled ratings (sft_hf/evaluation/style_control.py): FastChat's markdown counts, the fit against
FastChat's own loss minimised by scipy, a planted verbose model that wins only through length, Chatbot Arena's
conv_metadata files, and `sft-hf arena --leaderboard --style_control`."""
import math
import random

import numpy as np
import pytest

from sft_hf.errors import DataError
from sft_hf.evaluation.arena.ratings import compute_leaderboard
from sft_hf.evaluation.arena.votes import Vote, VoteStore
from sft_hf.evaluation.style_control import REGULARISATION, fit_style_controlled, style_counts, style_features

MARKDOWN = """# Title
## Part one
#not a header
####### seven hashes are no header
1. first
2. second
   - nested item
* star item
+ plus item
-not an item
Some **bold** words, __more bold__, ** spaced ** (FastChat counts it) and **across
lines** (it does not).
```python
# a comment, not a header
- not an item
**not bold**
```
### Part two
"""


def test_markdown_counts_follow_fastchats_rules():
    counts = style_counts(MARKDOWN)
    assert counts == {"length": len(MARKDOWN), "headers": 3, "lists": 5, "bold": 3}
    assert style_counts("") == {"length": 0, "headers": 0, "lists": 0, "bold": 0}


TRUE = {"anchor": 1100.0, "plain": 1000.0, "verbose": 950.0}
LENGTHS = {"anchor": (100, 300), "plain": (100, 300), "verbose": (500, 900)}
LENGTH_WEIGHT = 3.0  # people's preference: logit += 3 · (a - b) / (a + b + 1) in characters


def answer(rng, model):
    text = "word " * (rng.randint(*LENGTHS[model]) // 5)
    return ("**Note** " if rng.random() < 0.3 else "") + text  # bold at random, unrelated to the vote


def verbose_arena(n=3000, seed=0):
    """Votes where `verbose` is the weakest model but writes three times as long, and people favour length."""
    rng = random.Random(seed)
    battles = []
    for _ in range(n):
        a, b = rng.sample(list(TRUE), 2)
        ra, rb = answer(rng, a), answer(rng, b)
        d = (len(ra) - len(rb)) / (len(ra) + len(rb) + 1)
        logit = math.log(10) / 400 * (TRUE[a] - TRUE[b]) + LENGTH_WEIGHT * d
        winner = "model_a" if rng.random() < 1 / (1 + math.exp(-logit)) else "model_b"
        battles.append({"model_a": a, "model_b": b, "winner": winner, "response_a": ra, "response_b": rb})
    return battles


def test_style_control_recovers_the_planted_order_where_length_wins_the_plain_rating():
    battles = verbose_arena()
    plain = compute_leaderboard(battles, rounds=200, seed=0)
    assert [s.model for s in plain.standings][0] == "verbose"  # length carries it to the top

    style = fit_style_controlled(battles, rounds=200, seed=0)
    fitted = dict(zip(style.models, style.ratings))
    assert sorted(fitted, key=fitted.get, reverse=True) == ["anchor", "plain", "verbose"]
    centred = {m: r - np.mean(list(TRUE.values())) + 1000 for m, r in TRUE.items()}
    for k, model in enumerate(style.models):
        assert style.lower[k] <= centred[model] <= style.upper[k], (model, style.lower[k], style.upper[k])
        assert abs(fitted[model] - centred[model]) < 25
    # the length coefficient is the planted weight per standard deviation of the normalised difference
    features, kept = style_features(battles)
    lengths = np.array([[len(b["response_a"]), len(b["response_b"])] for b in battles], dtype=float)
    spread = ((lengths[:, 0] - lengths[:, 1]) / (lengths.sum(axis=1) + 1)).std()
    beta, low, high = style.coefficients["length"]
    assert kept == ["length", "bold"] and style.coefficients["headers"] is None
    assert low <= LENGTH_WEIGHT * spread <= high and abs(beta / spread - LENGTH_WEIGHT) < 0.3
    assert style.coefficients["bold"][1] < 0 < style.coefficients["bold"][2]  # bold was unrelated to the vote


def fastchat_fit(battles):
    """FastChat's contextual_bt_loss_and_grad minimised with scipy's L-BFGS-B, as its compute_style_control does,
    on the same features (an independent optimiser for the same objective)."""
    from scipy.optimize import minimize
    from scipy.special import expit

    models = sorted({b[k] for b in battles for k in ("model_a", "model_b")})
    index = {m: i for i, m in enumerate(models)}
    matchups = np.array([[index[b["model_a"]], index[b["model_b"]]] for b in battles])
    features, _ = style_features(battles)
    outcomes = np.array([{"model_a": 1.0, "model_b": 0.0}.get(b["winner"], 0.5) for b in battles])
    alpha, reg, n = math.log(10), REGULARISATION, len(models)

    def loss(params):
        ratings, beta = params[:n], params[n:]
        probs = expit(alpha * (ratings[matchups[:, 0]] - ratings[matchups[:, 1]]) + features @ beta)
        nll = -(np.log(probs) * outcomes + np.log(1 - probs) * (1 - outcomes)).sum()
        return nll + reg / 2 * params @ params

    result = minimize(loss, np.zeros(n + features.shape[1]), method="L-BFGS-B", options={"gtol": 1e-10,
                                                                                           "maxiter": 10_000})
    ratings = 400 * result.x[:n]
    return dict(zip(models, ratings - ratings.mean() + 1000)), result.x[n:]


def test_the_fit_is_fastchats_objective():
    battles = verbose_arena(n=600, seed=3)
    for k in range(0, 600, 7):
        battles[k]["winner"] = "tie" if k % 2 else "tie (bothbad)"
    theirs, beta = fastchat_fit(battles)
    ours = fit_style_controlled(battles, rounds=0)
    assert dict(zip(ours.models, ours.ratings)) == pytest.approx(theirs, abs=0.05)
    assert [ours.coefficients[name][0] for name in ("length", "bold")] == pytest.approx(beta, abs=1e-4)


def test_chatbot_arenas_conv_metadata_gives_the_same_fit():
    battles = verbose_arena(n=300, seed=5)
    as_metadata = []
    for b in battles:
        meta = {}
        for side in "ab":
            counts = style_counts(b[f"response_{side}"])
            meta.update({f"sum_assistant_{side}_tokens": counts["length"],
                         f"header_count_{side}": {"h1": counts["headers"]},
                         f"list_count_{side}": {"ordered": 0, "unordered": counts["lists"]},
                         f"bold_count_{side}": {"**": counts["bold"], "__": 0}})
        as_metadata.append({"model_a": b["model_a"], "model_b": b["model_b"], "winner": b["winner"],
                            "conv_metadata": meta})
    a, b = fit_style_controlled(battles, rounds=0), fit_style_controlled(as_metadata, rounds=0)
    assert a.ratings.tolist() == pytest.approx(b.ratings.tolist(), abs=1e-9)
    with pytest.raises(DataError, match=r"battle 0 \(no question_id\): style control needs both answers"):
        fit_style_controlled([{"model_a": "x", "model_b": "y", "winner": "tie"}], rounds=0)


def test_cli_leaderboard_with_style_control(tmp_path, capsys):
    from sft_hf.cli import main

    store = VoteStore(tmp_path / "votes.sqlite")
    for k, b in enumerate(verbose_arena(n=1500, seed=1)):
        store.add(Vote(f"b{k}", b["model_a"], b["model_b"], b["winner"], "q", b["response_a"], b["response_b"]))
    assert main(["arena", "--leaderboard", str(store.path), "--style_control", "--bootstrap_rounds", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    plain_first = lines[3].split()
    assert plain_first[:2] == ["1", "verbose"]
    at = lines.index("Style-controlled (Chatbot Arena's style control: length, headers, lists and bold as their own "
                     "terms; ratings at equal style)")
    rows = [line.split() for line in lines[at + 2:at + 5]]
    assert [(r[0], r[1], r[-1]) for r in rows] == [("1", "anchor", "2"), ("2", "plain", "3"), ("3", "verbose", "1")]
    assert lines[at + 5].startswith("style coefficients (logit per standard deviation, 95% interval): length +")
    assert "headers -, lists -" in lines[at + 5]
