"""Win rates from pairwise verdicts: the raw rate with a bootstrap interval, and AlpacaEval 2's length-controlled rate.

An outcome is the model's result against the baseline on one pair: 1 a win, 0.5 a tie, 0 a loss. The raw win rate
is their mean. Judges prefer longer answers, so AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled AlpacaEval")
fits a logistic regression of the outcome on a model term and tanh of the length difference, that difference
(in characters, model minus baseline) divided by its standard deviation and not centred, and reports the mean
prediction with the length term set to 0: the win rate had both answers been as long. Here the model term is the
only other feature (no per-instruction difficulty: that needs AlpacaEval's table of other models' verdicts).
Ties are soft labels 0.5: each pair is a win weighted by its outcome and a loss weighted by 1 - outcome.

Pure numpy / scikit-learn; the plot imports matplotlib (its Figure, no pyplot) only when called.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CONFIDENCE = 0.95
# Weak L2 regularisation, as AlpacaEval's fit without cross-validation (C=100): it changes nothing measurable on
# ordinary data and keeps the coefficients finite where length separates the verdicts perfectly.
REGULARISATION_C = 100.0


@dataclass
class LengthControlledFit:
    win_rate: float  # the mean prediction with the length term at 0
    model_coefficient: float | None  # the model term: logit of the length-free win rate (None: no fit)
    length_coefficient: float  # weight of tanh(standardised length difference); > 0: the judge favours length


@dataclass
class WinRateSummary:
    num_pairs: int
    wins: int
    ties: int
    losses: int
    win_rate: float | None  # (wins + ties / 2) / num_pairs
    win_rate_ci: tuple[float, float] | None
    lc_win_rate: float | None
    lc_win_rate_ci: tuple[float, float] | None
    model_coefficient: float | None
    length_coefficient: float | None
    mean_length_model: float | None  # characters
    mean_length_baseline: float | None
    confidence: float = CONFIDENCE
    bootstrap_samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def win_rate(outcomes) -> float:
    """(wins + ties / 2) / n."""
    return float(np.mean(np.asarray(outcomes, dtype=float)))


def standardized_length_term(length_differences) -> np.ndarray:
    """tanh(d / std(d)), AlpacaEval's length feature: d divided by its standard deviation (pandas' ddof=1), not
    centred, so 0 still means "as long as the baseline". All differences equal (or one pair): no length signal."""
    d = np.asarray(length_differences, dtype=float)
    scale = d.std(ddof=1) if len(d) > 1 else 0.0
    return np.tanh(d / scale) if scale > 0 else np.zeros_like(d)


def fit_length_controlled(outcomes, length_differences, C: float = REGULARISATION_C) -> LengthControlledFit:
    """Logistic regression outcome ~ model term + tanh(standardised length difference), ties as soft labels."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(outcomes, dtype=float)
    if y.min() == y.max():  # every pair the same outcome: nothing to regress; length changes nothing
        return LengthControlledFit(float(y[0]), None, 0.0)
    features = np.column_stack([np.ones(len(y)), standardized_length_term(length_differences)])
    # soft labels: every pair once as a win weighted by its outcome, once as a loss weighted by the rest
    X = np.vstack([features, features])
    labels = np.r_[np.ones(len(y)), np.zeros(len(y))]
    weights = np.r_[y, 1 - y]
    keep = weights > 0
    model = LogisticRegression(C=C, fit_intercept=False, max_iter=1000)
    model.fit(X[keep], labels[keep], sample_weight=weights[keep])
    model_coef, length_coef = model.coef_[0]
    # The mean prediction at length term 0: with no other feature it is the same for every pair.
    return LengthControlledFit(float(1 / (1 + np.exp(-model_coef))), float(model_coef), float(length_coef))


def bootstrap_interval(values, confidence: float = CONFIDENCE, axis: int | None = None):
    """The percentile interval of bootstrap estimates: (low, high) as floats, or with `axis` one interval per
    column as two arrays (e.g. the arena's (resamples, models) ratings with axis=0)."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(np.asarray(values, dtype=float), [tail, 100 - tail], axis=axis)
    return (float(low), float(high)) if axis is None else (low, high)


def summarize_outcomes(outcomes, model_lengths, baseline_lengths, bootstrap_samples: int = 1000, seed: int = 0,
                       confidence: float = CONFIDENCE) -> WinRateSummary:
    """Counts, raw and length-controlled win rates, each with a percentile bootstrap interval over pairs (resampled
    with replacement, `seed`ed: the same verdicts give the same interval). Lengths are in characters."""
    y = np.asarray(outcomes, dtype=float)
    if y.size and not np.isin(y, (0.0, 0.5, 1.0)).all():
        raise ValueError("outcomes must be 1 (win), 0.5 (tie) or 0 (loss)")
    lengths_m, lengths_b = np.asarray(model_lengths, dtype=float), np.asarray(baseline_lengths, dtype=float)
    if not len(y) == len(lengths_m) == len(lengths_b):
        raise ValueError(f"{len(y)} outcomes but {len(lengths_m)} and {len(lengths_b)} lengths")
    counts = dict(wins=int((y == 1).sum()), ties=int((y == 0.5).sum()), losses=int((y == 0).sum()))
    if not y.size:
        return WinRateSummary(0, **counts, win_rate=None, win_rate_ci=None, lc_win_rate=None, lc_win_rate_ci=None,
                              model_coefficient=None, length_coefficient=None, mean_length_model=None,
                              mean_length_baseline=None, confidence=confidence)
    diff = lengths_m - lengths_b
    fit = fit_length_controlled(y, diff)
    raw_ci = lc_ci = None
    if bootstrap_samples > 0:
        rng = np.random.default_rng(seed)
        samples = rng.integers(0, len(y), size=(bootstrap_samples, len(y)))
        raw_ci = bootstrap_interval(y[samples].mean(axis=1), confidence)
        lc_ci = bootstrap_interval([fit_length_controlled(y[s], diff[s]).win_rate for s in samples], confidence)
    return WinRateSummary(
        len(y), **counts, win_rate=win_rate(y), win_rate_ci=raw_ci, lc_win_rate=fit.win_rate, lc_win_rate_ci=lc_ci,
        model_coefficient=fit.model_coefficient, length_coefficient=fit.length_coefficient,
        mean_length_model=float(lengths_m.mean()), mean_length_baseline=float(lengths_b.mean()),
        confidence=confidence, bootstrap_samples=bootstrap_samples,
    )


def pairwise_figure(summary: dict):
    """Two panels: wins / ties / losses, and the win rate and length-controlled win rate with their intervals. The
    names and the position statistics (consistency, first_position_rate: how far the judge's verdicts follow order,
    in the title) are read from the summary (sft_hf/evaluation/judge/pairwise.py's run_pairwise).
    matplotlib's Figure, not pyplot: no global backend or figure state."""
    from matplotlib.figure import Figure

    model_name, baseline_name = summary.get("model", "model"), summary.get("baseline", "baseline")
    fig = Figure(figsize=(9, 3.8))
    counts_ax, rates_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1]})
    labels = [f"{model_name}\nwins", "ties", f"{baseline_name}\nwins"]
    values = [summary["wins"], summary["ties"], summary["losses"]]
    bars = counts_ax.bar(labels, values, color=["tab:green", "tab:gray", "tab:red"])
    counts_ax.bar_label(bars)
    counts_ax.set_ylim(0, max(values + [1]) * 1.15)  # room for the labels
    counts_ax.set_ylabel("pairs")
    counts_ax.set_title(f"{summary['num_pairs']} pairs with a verdict")

    names, rates, errors = [], [], [[], []]
    for name, key in (("win rate", "win_rate"), ("length-controlled", "lc_win_rate")):
        rate, ci = summary.get(key), summary.get(f"{key}_ci")
        if rate is None:
            continue
        names.append(name)
        rates.append(100 * rate)
        low, high = ci if ci else (rate, rate)
        errors[0].append(100 * max(rate - low, 0))
        errors[1].append(100 * max(high - rate, 0))
    rates_ax.errorbar(names, rates, yerr=errors, fmt="o", capsize=6, color="tab:blue")
    for x, rate in enumerate(rates):
        rates_ax.annotate(f"{rate:.1f} %", (x, rate), textcoords="offset points", xytext=(10, 0), va="center")
    rates_ax.axhline(50, color="gray", linestyle="--", linewidth=1)
    rates_ax.set_ylim(0, 100)
    rates_ax.set_xlim(-0.5, len(names) - 0.5)
    rates_ax.set_ylabel(f"% for {model_name} ({round(100 * summary.get('confidence', CONFIDENCE))} % interval)")
    rates_ax.set_title(f"{model_name} vs {baseline_name}")
    fig.suptitle(position_title(summary), fontsize=10)
    fig.tight_layout()
    return fig


def position_title(summary: dict) -> str:
    title = "Pairwise judge"
    if summary.get("consistency") is not None:
        title += f": the two orders agreed on {100 * summary['consistency']:.0f} % of pairs"
        if summary.get("first_position_rate") is not None:
            title += f", the first position won {100 * summary['first_position_rate']:.0f} % of verdicts"
    return title


def plot_pairwise(summary: dict, path: str | Path) -> str:
    """pairwise_figure(summary) saved as a PNG at `path`."""
    pairwise_figure(summary).savefig(path)
    return str(path)
