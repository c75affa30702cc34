"""Bradley-Terry ratings from arena votes, computed as Chatbot Arena's leaderboard notebook does (`compute_mle_elo`),
with bootstrap intervals, vote counts and the win-rate matrix.

The model: P(i beats j) = 1 / (1 + 10 ** ((R_j - R_i) / 400)), so 400 points are odds of 10 to 1. The fit is the
notebook's: a logistic regression without intercept or penalty on one row per pair of models that met, +ln 10 in
one model's column and -ln 10 in the other's; a decisive vote weighs 2 for its winner, a tie 1 for each side (half
a win each); "tie (bothbad)" counts as a tie, as Chatbot Arena counts it. Ratings are 400 · coefficient, shifted
to a mean of 1000 (the notebook adds 1000 to a fit that lands on mean zero; here the shift is explicit).
95 % intervals: the 2.5th and 97.5th percentiles over `rounds` refits on the votes resampled with replacement
(seeded), as the notebook's `get_bootstrap_result` (win_rate.py's bootstrap_interval, as the pairwise
judge's); the rating shown is the fit on all votes.

No gradio here: `sft-hf arena --leaderboard` starts fast and the maths is testable alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sft_hf.evaluation.win_rate import CONFIDENCE, bootstrap_interval

if TYPE_CHECKING:  # style_control imports this module
    from sft_hf.evaluation.style_control import StyleControlled

SCALE, BASE, MEAN_RATING = 400, 10, 1000  # Chatbot Arena's scale: 400 points per factor of 10 in the odds


@dataclass
class Standing:
    model: str
    rating: float
    lower: float  # 95 % bootstrap interval
    upper: float
    votes: int
    wins: int
    losses: int
    ties: int  # "tie" votes
    bothbad: int  # "tie (bothbad)" votes, counted as ties in the rating
    style_rating: float | None = None  # style-controlled (sft_hf/evaluation/style_control.py), when asked for
    style_lower: float | None = None
    style_upper: float | None = None


@dataclass
class Leaderboard:
    standings: list[Standing]  # best first
    num_votes: int
    rounds: int
    seed: int
    warning: str | None = None  # why the ratings are not determined by the votes (see finite_ratings_problem)
    voters: dict | None = None  # who voted (count_voters)
    style: StyleControlled | None = None  # the style-controlled fit, with its coefficients


class Battles:
    """The votes as counts: how often each (model_a, model_b, outcome) occurred (outcome 2: A won, 1: tie, 0: B
    won)."""

    def __init__(self, battles: list[dict]):
        self.models = sorted({b[key] for b in battles for key in ("model_a", "model_b")})
        index = {m: i for i, m in enumerate(self.models)}
        outcome = {"model_a": 2, "model_b": 0, "tie": 1, "tie (bothbad)": 1}
        rows = np.array([(index[b["model_a"]], index[b["model_b"]], outcome[b["winner"]]) for b in battles],
                        dtype=np.int64).reshape(-1, 3)
        self.cells, self.counts = np.unique(rows, axis=0, return_counts=True)
        self.num_votes = len(battles)
        self.pairs = sorted({tuple(sorted(c[:2])) for c in self.cells.tolist()})  # pairs of models that met

    def win_weights(self, counts: np.ndarray) -> np.ndarray:
        """W[i, j] = 2 · (votes i won against j) + (ties between i and j), whichever side each model was on."""
        n = len(self.models)
        weights = np.zeros((n, n))
        a, b, outcome = self.cells.T
        np.add.at(weights, (a, b), counts * outcome)  # A won: 2 for A, a tie: 1
        np.add.at(weights, (b, a), counts * (2 - outcome))  # B won: 2 for B, a tie: 1
        return weights


def fit_logistic(X: np.ndarray, y: np.ndarray, weights: np.ndarray, reg: float = 0.0, tol: float = 1e-10,
                 max_iterations: int = 100, start: np.ndarray | None = None) -> np.ndarray:
    """Coefficients θ maximising  Σ_n w_n (y_n log σ(x_n·θ) + (1 - y_n) log(1 - σ(x_n·θ))) - reg/2 · |θ|²  for each
    row of `weights` (rounds, rows) at once: Newton's method with step halving, so a bootstrap's thousand refits cost
    a few matrix products per step instead of a thousand solver runs. y may be soft (a tie is 1/2, one row weighing
    half a win and half a loss, as Chatbot Arena's fits count it). Where the votes fix no finite maximum (a model
    that won every vote) the coefficients grow until the gradient is below tol · the row's weight, as any
    optimiser's would: far apart and arbitrary (finite_ratings_problem says so). `start`: where every row's search
    begins (a bootstrap's refits start at the fit on all votes, a few steps away), else 0."""
    from scipy.special import expit

    X, y = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    W = np.atleast_2d(np.asarray(weights, dtype=float))
    rounds, k = len(W), X.shape[1]
    outer = (X[:, :, None] * X[:, None, :]).reshape(len(X), k * k)  # per row x xᵀ, flattened: H = (w p(1-p)) @ outer
    scale = W.sum(axis=1) + reg
    ridge = np.eye(k) * (reg + 1e-12 * scale.max())  # a tiny ridge: models that never met leave H singular

    def loss(theta, z):  # at logits z = θ·x: -Σ w (y log σ(z) + (1 - y) log σ(-z)) = Σ w (log(1 + e^z) - y z)
        return (W * (np.logaddexp(0, z) - y * z)).sum(axis=1) + reg / 2 * (theta ** 2).sum(axis=1)

    theta = np.zeros((rounds, k)) if start is None else np.tile(start, (rounds, 1)).astype(float)
    z = theta @ X.T
    current = loss(theta, z)
    for _ in range(max_iterations):
        p = expit(z)
        gradient = (W * (p - y)) @ X + reg * theta
        active = np.abs(gradient).max(axis=1) > tol * scale
        if not active.any():
            break
        hessian = ((W * p * (1 - p)) @ outer).reshape(rounds, k, k) + ridge
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0] * active[:, None]
        t = np.ones(rounds)
        for _ in range(40):  # halve the step where the loss would rise (far from the optimum Newton overshoots)
            trial = theta - t[:, None] * step
            trial_z = trial @ X.T
            new = loss(trial, trial_z)
            rose = new > current + 1e-12 * np.abs(current)
            if not rose.any():
                break
            t[rose] /= 2
        theta, z, current = trial, trial_z, new
    return theta


BATCH = 250  # bootstrap refits per fit_logistic call: bounds the (rounds, rows) arrays held at once


def fit_logistic_batches(X, y, weights, reg: float = 0.0) -> np.ndarray:
    """fit_logistic on weights[0] (all the votes), then on the other rows (bootstrap samples), BATCH at a time,
    each starting from the first fit."""
    first = fit_logistic(X, y, weights[:1], reg)
    rest = [fit_logistic(X, y, weights[k:k + BATCH], reg, start=first[0]) for k in range(1, len(weights), BATCH)]
    return np.concatenate([first, *rest])


def bradley_terry_design(battles: "Battles") -> tuple[np.ndarray, np.ndarray]:
    """One row per cell (model_a, model_b, outcome): +ln 10 in model_a's column, -ln 10 in model_b's, the first
    model's column left out (its rating is the reference: without a penalty the ratings are fixed only up to a
    shift); the label 1, 1/2 or 0."""
    n = len(battles.models)
    X = np.zeros((len(battles.cells), n))
    rows = np.arange(len(battles.cells))
    X[rows, battles.cells[:, 0]] += math.log(BASE)
    X[rows, battles.cells[:, 1]] -= math.log(BASE)
    return X[:, 1:], battles.cells[:, 2] / 2


def to_ratings(coefficients: np.ndarray) -> np.ndarray:
    """Chatbot Arena's scale: 400 · coefficient, shifted to a mean of 1000 (per row)."""
    ratings = SCALE * coefficients
    return ratings - ratings.mean(axis=-1, keepdims=True) + MEAN_RATING


def fit_bradley_terry(battles: Battles, counts: np.ndarray | None = None) -> np.ndarray:
    """Ratings (mean 1000) of battles.models from the votes; with `counts` (votes per cell, one row per bootstrap
    sample) a (samples, models) array of refits."""
    n = len(battles.models)
    weights = battles.counts[None, :] if counts is None else np.atleast_2d(counts)
    if n < 2:
        ratings = np.full((len(weights), n), float(MEAN_RATING))
    else:
        X, y = bradley_terry_design(battles)
        theta = fit_logistic_batches(X, y, weights)
        ratings = to_ratings(np.column_stack([np.zeros(len(theta)), theta]))
    return ratings[0] if counts is None or np.ndim(counts) == 1 else ratings


def bootstrap_ratings(battles: Battles, rounds: int = 1000, seed: int = 0) -> tuple[np.ndarray, float]:
    """(rounds, models) ratings refitted on the votes resampled with replacement (drawing num_votes votes from the
    observed ones is drawing each cell's count from a multinomial), and the fraction of resamples whose ratings
    the votes do not determine (see finite_ratings_problem)."""
    rng = np.random.default_rng(seed)
    samples = rng.multinomial(battles.num_votes, battles.counts / battles.counts.sum(), size=rounds)
    # the fit on all votes first: fit_logistic_batches starts every refit from it
    ratings = fit_bradley_terry(battles, np.vstack([battles.counts, samples]))[1:].reshape(rounds, len(battles.models))
    undetermined = np.mean([not strongly_connected(battles.win_weights(counts)) for counts in samples])
    return ratings, float(undetermined)


def strongly_connected(beat: np.ndarray) -> bool:
    """Whether every model reaches every other along "won or tied against" edges (beat[i, j] > 0)."""
    def reaches_all(adjacency) -> bool:
        seen, todo = {0}, [0]
        while todo:
            for j in np.flatnonzero(adjacency[todo.pop()]).tolist():
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return len(seen) == len(adjacency)

    return reaches_all(beat > 0) and reaches_all(beat.T > 0)


def finite_ratings_problem(battles: Battles) -> str | None:
    """Why maximum likelihood gives no finite ratings, or None. They are finite exactly when every split of the
    models into two groups has each group winning or tying against the other at least once (the graph "i won or
    tied against j" is strongly connected); otherwise the fit stops at arbitrary, far-apart numbers."""
    weights = battles.win_weights(battles.counts)
    if strongly_connected(weights):
        return None
    won_all = [m for k, m in enumerate(battles.models) if not weights[:, k].any()]  # no loss, no tie
    lost_all = [m for k, m in enumerate(battles.models) if not weights[k].any()]
    details = "; ".join([f"won every vote: {', '.join(won_all)}"] * bool(won_all)
                        + [f"lost every vote: {', '.join(lost_all)}"] * bool(lost_all)
                        ) or "a group of models never won or tied against the others"
    return f"ratings not determined by these votes ({details}): the fit stops at arbitrary, far-apart numbers; " \
           "collect more votes"


def winner_of(battle: dict) -> str | None:
    """The model that won the battle, None for a tie ("model_a" means the model on the left, battle["model_a"])."""
    return battle[battle["winner"]] if battle["winner"] in ("model_a", "model_b") else None


def loser_of(battle: dict) -> str | None:
    """The model that lost the battle, None for a tie."""
    return {"model_a": battle["model_b"], "model_b": battle["model_a"]}.get(battle["winner"])


def count_voters(battles: list[dict]) -> dict:
    """Who voted, from each battle's `judge` (a login name, "anonymous-<session>" for an anonymous browser session
    of this arena, "anonymous" when neither was recorded; Chatbot Arena's files hold a user id): how many voters,
    how many of them anonymous sessions, and the most votes from one voter (where stuffing would show)."""
    per_voter: dict[str, int] = {}
    for b in battles:
        judge = b.get("judge")
        if judge and judge != "anonymous":
            per_voter[judge] = per_voter.get(judge, 0) + 1
    top = max(per_voter, key=per_voter.get, default=None)
    return {"voters": len(per_voter), "anonymous_sessions": sum(j.startswith("anonymous-") for j in per_voter),
            "unattributed": len(battles) - sum(per_voter.values()), "most_from_one": per_voter.get(top, 0)}


def compute_leaderboard(battles: list[dict], rounds: int = 1000, seed: int = 0,
                        style_control: bool = False) -> Leaderboard:
    """Ratings, intervals and counts; with style_control also the style-controlled ratings (their answers needed:
    conversation_a/b as the votes file and its export hold them)."""
    if not battles:
        return Leaderboard([], 0, rounds, seed)
    table = Battles(battles)
    ratings = fit_bradley_terry(table)
    samples, undetermined = bootstrap_ratings(table, rounds, seed) if rounds else (ratings[None, :], 0.0)
    lower, upper = bootstrap_interval(samples, CONFIDENCE, axis=0)  # one interval per model
    standings = []
    for k, model in enumerate(table.models):
        mine = [b for b in battles if model in (b["model_a"], b["model_b"])]
        wins = sum(winner_of(b) == model for b in mine)
        ties = sum(b["winner"] == "tie" for b in mine)
        bothbad = sum(b["winner"] == "tie (bothbad)" for b in mine)
        standings.append(Standing(model, float(ratings[k]), float(lower[k]), float(upper[k]), len(mine), wins,
                                  len(mine) - wins - ties - bothbad, ties, bothbad))
    style = None
    if style_control:
        from sft_hf.evaluation.style_control import fit_style_controlled

        style = fit_style_controlled(battles, rounds, seed)
        for s in standings:
            k = style.models.index(s.model)
            s.style_rating, s.style_lower, s.style_upper = (float(style.ratings[k]), float(style.lower[k]),
                                                            float(style.upper[k]))
    standings.sort(key=lambda s: (-s.rating, s.model))
    warning = finite_ratings_problem(table)
    if warning is None and undetermined > (1 - CONFIDENCE) / 2:  # more than each end of the interval leaves out
        warning = (f"in {undetermined:.0%} of the bootstrap resamples a model (or a group of models) won or lost every "
                   "vote it had, so those refits have no finite ratings: the far ends of the 95% intervals are "
                   "arbitrary; collect more votes")
    return Leaderboard(standings, len(battles), rounds, seed, warning, count_voters(battles), style)


def win_rate_matrix(battles: list[dict], models: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(fraction, decisive): fraction[i, j] of the decisive votes between models i and j that i won, decisive[i, j]
    how many there were. Ties are left out, as in Chatbot Arena's win-fraction plot ("non-tied battles"); NaN
    where two models never had a decisive vote."""
    index = {m: i for i, m in enumerate(models)}
    wins = np.zeros((len(models),) * 2, dtype=int)
    for b in battles:
        if winner_of(b) is not None:
            wins[index[winner_of(b)], index[loser_of(b)]] += 1
    decisive = wins + wins.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(decisive > 0, wins / decisive, np.nan), decisive


def plot_win_rates(battles: list[dict], models: list[str], path) -> str:
    """The win-rate matrix as a PNG (a path or a binary file): the row model's share of the decisive votes against
    the column model.
    matplotlib's Figure, not pyplot: no global state, so the page's handler threads cannot mix two plots."""
    from matplotlib.figure import Figure

    fraction, decisive = win_rate_matrix(battles, models)
    size = 2.5 + 0.9 * len(models)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(fraction, cmap="RdBu", vmin=0, vmax=1)
    for i in range(len(models)):
        for j in range(len(models)):
            if decisive[i, j]:
                wins = round(fraction[i, j] * decisive[i, j])
                ax.text(j, i, f"{fraction[i, j]:.2f}\n{wins} of {decisive[i, j]}", ha="center", va="center", fontsize=8,
                        color="white" if abs(fraction[i, j] - 0.5) > 0.3 else "black")
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("against (column)")
    ax.set_ylabel("model (row)")
    ax.set_title("Row model's wins among decisive votes (ties left out)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return str(path)


def voters_line(board: Leaderboard) -> str:
    """"from 12 voters (3 anonymous sessions); most from one voter: 40 (18%)", or "" when no vote names its voter."""
    v = board.voters
    if not v or not v["voters"]:
        return ""
    line = f"from {v['voters']} voters ({v['anonymous_sessions']} anonymous sessions"
    line += f", {v['unattributed']} votes without a voter)" if v["unattributed"] else ")"
    return line + f"; most from one voter: {v['most_from_one']} ({v['most_from_one'] / board.num_votes:.0%})"


def style_ranks(board: Leaderboard) -> list[Standing]:
    return sorted(board.standings, key=lambda s: (-s.style_rating, s.model))


def format_leaderboard(board: Leaderboard, source: str = "") -> str:
    """The leaderboard as text for the terminal (`sft-hf arena --leaderboard`)."""
    if not board.standings:
        return f"No votes yet{f' in {source}' if source else ''}."
    ties = sum(s.ties for s in board.standings) // 2
    bothbad = sum(s.bothbad for s in board.standings) // 2
    lines = [f"Arena leaderboard: {board.num_votes} votes{f' from {source}' if source else ''} "
             f"({ties} ties, {bothbad} both bad)",
             f"Bradley-Terry ratings (400 points = 10:1 odds, mean 1000), 95% intervals from {board.rounds} "
             f"bootstrap resamples (seed {board.seed})"]
    width = max(5, *(len(s.model) for s in board.standings))
    lines.append(f"{'rank':>4}  {'model':<{width}}  {'rating':>6}  {'95% interval':>13}  {'votes':>5}  {'wins':>4}  "
                 f"{'losses':>6}  {'ties':>4}  {'both bad':>8}")
    for rank, s in enumerate(board.standings, 1):
        interval = f"{s.lower:.0f} to {s.upper:.0f}"
        lines.append(f"{rank:>4}  {s.model:<{width}}  {s.rating:>6.0f}  {interval:>13}  {s.votes:>5}  {s.wins:>4}  "
                     f"{s.losses:>6}  {s.ties:>4}  {s.bothbad:>8}")
    if board.style is not None:
        lines.append("Style-controlled (Chatbot Arena's style control: length, headers, lists and bold as their own "
                     "terms; ratings at equal style)")
        lines.append(f"{'rank':>4}  {'model':<{width}}  {'rating':>6}  {'95% interval':>13}  {'plain rank':>10}")
        plain = {s.model: k for k, s in enumerate(board.standings, 1)}
        for rank, s in enumerate(style_ranks(board), 1):
            interval = f"{s.style_lower:.0f} to {s.style_upper:.0f}"
            lines.append(f"{rank:>4}  {s.model:<{width}}  {s.style_rating:>6.0f}  {interval:>13}  {plain[s.model]:>10}")
        from sft_hf.evaluation.style_control import format_coefficients

        lines.append(f"style coefficients (logit per standard deviation, 95% interval): "
                     f"{format_coefficients(board.style)}")
    if voters := voters_line(board):
        lines.append(f"Votes {voters}")
    if board.warning:
        lines.append(f"warning: {board.warning}")
    return "\n".join(lines)
