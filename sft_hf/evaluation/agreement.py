"""Judge–human agreement: how often the pairwise judge agrees with people's arena votes on the same prompts and models.

People's votes are the ground truth a judge is measured against (MT-bench reports GPT-4 agreeing with experts 66 %
with ties, 85 % without; AlpacaEval ranks judges by agreement with human annotators). The judge's verdicts are
recipes/evaluate.py's pairwise_verdicts.json (sft_hf/evaluation/judge/pairwise.py: per pair the combined winner,
"model", "baseline" or "tie", and both orders' single verdicts); the votes are the arena's votes file (or its
JSONL export). A vote is compared with the verdict on the same prompt (instruction + input), between the same two
models, on the same two answers (a vote on other answers, e.g. a live battle, is left out and counted), each from
the judge's point of view: its model won, a tie (both bad included), its baseline won.

    agreement with ties     share of votes whose label equals the judge's (three labels)
    agreement without ties  the same over votes where neither the person nor the judge said tie (MT-bench's "w/o tie")
    Cohen's kappa           agreement beyond what the two label frequencies give by chance, (p_o - p_e) / (1 - p_e)

each with a 95 % bootstrap interval (prompts resampled with replacement, all of a prompt's votes together: votes on
one prompt are not independent); the confusion matrix; and, side by side, how often the first (left) answer won and
how often the longer answer won among decisive verdicts of the judge and votes of the people, and the judge's win
and length-controlled win rate beside the people's win and style-controlled win rate.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sft_hf.errors import DataError, RecipeError
from sft_hf.evaluation.win_rate import bootstrap_interval

LABELS = ("model", "tie", "baseline")  # from the judge's side: its model won, a tie, its baseline won


@dataclass
class Item:
    """One vote joined with the judge's verdict on the same prompt, models and answers."""
    prompt: tuple[str, str]
    pair: int  # the verdict's index in pairwise_verdicts.json
    judge: str  # LABELS
    human: str  # LABELS
    model_on_left: bool  # the judge's model was the person's answer A
    model_length: int  # characters
    baseline_length: int
    battle: dict = field(repr=False, default_factory=dict)  # the vote, as read_battles gives it


def read_verdicts(path: str | Path) -> dict:
    """pairwise_verdicts.json as recipes/evaluate.py writes it: model, baseline, judge, pairs."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"--agreement {path}: no such file (recipes/evaluate.py writes pairwise_verdicts.json "
                          "into its output folder)")
    try:
        verdicts = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not JSON ({e})") from None
    if not isinstance(verdicts, dict) or not isinstance(verdicts.get("pairs"), list) \
            or not all(isinstance(verdicts.get(k), str) for k in ("model", "baseline")):
        raise DataError(f"{path}: not a pairwise_verdicts.json (expected model, baseline and pairs, as "
                        "recipes/evaluate.py writes)")
    for k, pair in enumerate(verdicts["pairs"]):
        for name in ("model_response", "baseline_response"):
            if not isinstance(pair.get(name), str):
                raise DataError(f"{path}: pair {k}, field {name!r}: missing or not text")
        if pair.get("winner") not in (*LABELS, None):
            raise DataError(f"{path}: pair {k}, field 'winner': {pair.get('winner')!r} is not one of "
                            f"{', '.join(LABELS)} or null")
    return verdicts


def verdict_prompt(pair: dict) -> tuple[str, str] | None:
    """The instruction and input a voter would have seen for this pair (the arena shows a one-turn conversation as
    its user message); None for a prompt the arena cannot show (several turns)."""
    messages = pair.get("messages")
    if isinstance(messages, list) and messages:
        turns = [m for m in messages if isinstance(m, dict)]
        users = [m for m in turns if m.get("role") == "user"]
        if len(users) == 1 and turns[0] is users[0] and isinstance(users[0].get("content"), str):
            return users[0]["content"], ""
        return None
    if isinstance(pair.get("instruction"), str):
        return pair["instruction"], pair.get("input") or ""
    return None


def join_votes(verdicts: dict, battles: list[dict]) -> tuple[list[Item], dict]:
    """The votes between the judge's two models, each joined with the verdict on its prompt and answers, and what
    was left out: votes on other models, on prompts the judge did not see, on other answers, pairs without a
    verdict."""
    from sft_hf.evaluation.style_control import answer_text

    model, baseline = verdicts["model"], verdicts["baseline"]
    by_prompt: dict[tuple, list[int]] = {}
    for k, pair in enumerate(verdicts["pairs"]):
        if (prompt := verdict_prompt(pair)) is not None:
            by_prompt.setdefault(prompt, []).append(k)
    items, left_out = [], {"other models": 0, "prompt not judged": 0, "other answers": 0, "no verdict": 0}
    for b in battles:
        if {b["model_a"], b["model_b"]} != {model, baseline}:
            left_out["other models"] += 1
            continue
        prompt = (b.get("instruction"), b.get("input") or "")
        if prompt not in by_prompt:
            left_out["prompt not judged"] += 1
            continue
        model_on_left = b["model_a"] == model
        answers = (answer_text(b, "a") or "").strip(), (answer_text(b, "b") or "").strip()
        mine, theirs = answers if model_on_left else answers[::-1]
        same = [k for k in by_prompt[prompt] if verdicts["pairs"][k]["model_response"].strip() == mine
                and verdicts["pairs"][k]["baseline_response"].strip() == theirs]
        if not same:
            left_out["other answers"] += 1
            continue
        pair = verdicts["pairs"][same[0]]
        if pair["winner"] is None:
            left_out["no verdict"] += 1
            continue
        human = "tie" if b["winner"].startswith("tie") else \
            ("model" if (b["winner"] == "model_a") == model_on_left else "baseline")
        items.append(Item(prompt, same[0], pair["winner"], human, model_on_left, len(pair["model_response"]),
                          len(pair["baseline_response"]), b))
    return items, left_out


def confusion_matrix(items: list[Item]) -> np.ndarray:
    """counts[i, j]: votes the judge labelled LABELS[i] and the person LABELS[j]."""
    counts = np.zeros((3, 3), dtype=int)
    for item in items:
        counts[LABELS.index(item.judge), LABELS.index(item.human)] += 1
    return counts


def agreement_rates(counts: np.ndarray) -> tuple[float, float, float]:
    """(agreement with ties, agreement without ties, Cohen's kappa) from a confusion matrix; NaN where undefined."""
    n = counts.sum()
    if not n:
        return math.nan, math.nan, math.nan
    observed = np.trace(counts) / n
    decisive = counts[np.ix_([0, 2], [0, 2])]
    without_ties = np.trace(decisive) / decisive.sum() if decisive.sum() else math.nan
    chance = float((counts.sum(axis=1) / n) @ (counts.sum(axis=0) / n))
    kappa = (observed - chance) / (1 - chance) if chance < 1 else math.nan
    return float(observed), float(without_ties), float(kappa)


def bootstrap_agreement(items: list[Item], rounds: int, seed: int) -> np.ndarray:
    """(rounds, 3) agreement with ties, without ties and kappa over resamples of the prompts (with replacement,
    each prompt with all its votes)."""
    prompts = sorted({item.prompt for item in items})
    index = {p: k for k, p in enumerate(prompts)}
    per_prompt = np.zeros((len(prompts), 9))  # each prompt's confusion matrix, flattened
    for item in items:
        per_prompt[index[item.prompt], LABELS.index(item.judge) * 3 + LABELS.index(item.human)] += 1
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(prompts), np.full(len(prompts), 1 / len(prompts)), size=rounds)
    return np.array([agreement_rates((d @ per_prompt).reshape(3, 3)) for d in draws]).reshape(rounds, 3)


def interval(samples: np.ndarray) -> tuple[float, float] | None:
    kept = samples[~np.isnan(samples)]
    return bootstrap_interval(kept) if len(kept) else None


def preferences(items: list[Item], verdicts: dict) -> dict:
    """Side by side, for the judge and the people on the same joined prompts: how often the first (left, A) answer
    won, and how often the longer answer won, among decisive outcomes (ties left out), with the counts."""
    pairs = {item.pair for item in items}  # the judge's verdicts, each once however many votes it has
    first = [o["verdict"] for k in pairs for o in verdicts["pairs"][k].get("orders") or []
             if o.get("verdict") in ("A", "B")]
    people_decisive = [item for item in items if item.human != "tie"]

    def longer_won(winner: str, item: Item) -> bool | None:
        if item.model_length == item.baseline_length:
            return None
        return (winner == "model") == (item.model_length > item.baseline_length)

    judged = {item.pair: item for item in items}
    judge_longer = [longer_won(judged[k].judge, judged[k]) for k in pairs if judged[k].judge != "tie"]
    people_longer = [longer_won(item.human, item) for item in people_decisive]
    people_first = [(item.human == "model") == item.model_on_left for item in people_decisive]

    def share(values) -> dict:
        values = [v for v in values if v is not None]
        return {"rate": sum(values) / len(values) if values else None, "of": len(values)}

    return {"judge_first_position": share([v == "A" for v in first]), "people_first_position": share(people_first),
            "judge_longer_answer": share(judge_longer), "people_longer_answer": share(people_longer)}


def mean_interval(values, rounds: int, seed: int) -> tuple[float, float] | None:
    """The 95 % bootstrap interval of a mean (values resampled with replacement)."""
    if not rounds:
        return None
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    return interval(values[rng.integers(0, len(values), size=(rounds, len(values)))].mean(axis=1))


def win_rates(items: list[Item], verdicts: dict, rounds: int, seed: int) -> dict:
    """The judge's win rate of its model and its length-controlled win rate (AlpacaEval 2's, win_rate.py) on the
    joined pairs, beside the people's win rate and style-controlled win rate (style_control.py: the chance the
    model beats the baseline at equal style) on the joined votes. Intervals for all but the judge's
    length-controlled rate, whose bootstrap (a scikit-learn fit per resample) pairwise_summary.json already holds
    for all its pairs."""
    from sft_hf.evaluation.style_control import fit_style_controlled
    from sft_hf.evaluation.win_rate import fit_length_controlled

    score = {"model": 1.0, "tie": 0.5, "baseline": 0.0}
    judged = {item.pair: item for item in items}  # each verdict once, however many votes it has
    judge = [score[item.judge] for item in judged.values()]
    lengths = [item.model_length - item.baseline_length for item in judged.values()]
    people = [score[item.human] for item in items]
    result = {"judge_win_rate": float(np.mean(judge)), "judge_win_rate_ci": mean_interval(judge, rounds, seed),
              "judge_lc_win_rate": fit_length_controlled(judge, lengths).win_rate,
              "people_win_rate": float(np.mean(people)), "people_win_rate_ci": mean_interval(people, rounds, seed),
              "people_sc_win_rate": None, "people_sc_win_rate_ci": None}
    if len({item.human for item in items}) > 1:  # one outcome throughout: no finite fit
        style = fit_style_controlled([item.battle for item in items], rounds, seed)
        m, b = style.models.index(verdicts["model"]), style.models.index(verdicts["baseline"])

        def beats(ratings):
            return 1 / (1 + 10 ** ((ratings[..., b] - ratings[..., m]) / 400))

        result["people_sc_win_rate"] = float(beats(style.ratings))
        result["people_sc_win_rate_ci"] = interval(beats(style.samples)) if rounds else None
    return result


def compute_agreement(verdicts: dict, battles: list[dict], rounds: int = 1000, seed: int = 0) -> dict:
    items, left_out = join_votes(verdicts, battles)
    if not items:
        reasons = ", ".join(f"{n} {why}" for why, n in left_out.items() if n) or "no votes"
        raise DataError(f"no vote matches a verdict of the judge on {verdicts['model']!r} vs {verdicts['baseline']!r} "
                        f"({reasons}); the arena must compare the same two models (by these names) on the same "
                        "response files the judge saw")
    counts = confusion_matrix(items)
    rates = agreement_rates(counts)
    samples = bootstrap_agreement(items, rounds, seed) if rounds else np.full((1, 3), math.nan)
    report = {
        "model": verdicts["model"], "baseline": verdicts["baseline"], "judge": verdicts.get("judge"),
        "votes": len(items), "prompts": len({item.prompt for item in items}), "left_out": left_out,
        "labels": list(LABELS), "confusion": counts.tolist(),  # rows: the judge's label, columns: the people's
        "agreement": rates[0], "agreement_ci": interval(samples[:, 0]),
        "agreement_without_ties": None if math.isnan(rates[1]) else rates[1],
        "agreement_without_ties_ci": interval(samples[:, 1]),
        "votes_without_ties": int(counts[np.ix_([0, 2], [0, 2])].sum()),
        "kappa": None if math.isnan(rates[2]) else rates[2], "kappa_ci": interval(samples[:, 2]),
        "bootstrap_rounds": rounds, "seed": seed,
        **preferences(items, verdicts),
        **win_rates(items, verdicts, rounds, seed),
    }
    return report


def _pct(value, ci=None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.1f} %"
    return text + (f" (95 % CI {100 * ci[0]:.1f} to {100 * ci[1]:.1f})" if ci else "")


def _ci(ci) -> str:
    return "-" if not ci else f"{100 * ci[0]:.1f} to {100 * ci[1]:.1f}"


def format_agreement(report: dict) -> str:
    kappa = "-" if report["kappa"] is None else f"{report['kappa']:.3f}"
    if report["kappa"] is not None and report["kappa_ci"]:
        kappa += f" (95 % CI {report['kappa_ci'][0]:.3f} to {report['kappa_ci'][1]:.3f})"
    left = ", ".join(f"{n} {why}" for why, n in report["left_out"].items() if n)
    lines = [f"Judge vs people: {report['model']!r} vs {report['baseline']!r}, {report['votes']} votes on "
             f"{report['prompts']} prompts joined with the judge's verdicts" + (f" (left out: {left})" if left else ""),
             f"agreement with ties      {_pct(report['agreement'], report['agreement_ci'])}",
             f"agreement without ties   {_pct(report['agreement_without_ties'], report['agreement_without_ties_ci'])}"
             f"  ({report['votes_without_ties']} votes where neither said tie)",
             f"Cohen's kappa            {kappa}",
             "confusion (rows: the judge, columns: the people; model won / tie / baseline won):"]
    width = max(len(x) for x in LABELS) + 2
    lines.append(f"{'':>{width + 8}}" + "".join(f"{'people: ' + x:>{width + 10}}" for x in LABELS))
    for label, row in zip(LABELS, report["confusion"]):
        lines.append(f"{'judge: ' + label:>{width + 8}}" + "".join(f"{n:>{width + 10}}" for n in row))
    rows = [("first answer won (decisive)", "judge_first_position", "people_first_position",
             "judge: single-order verdicts; people: the left answer"),
            ("longer answer won (decisive)", "judge_longer_answer", "people_longer_answer", "")]
    lines.append(f"{'':<30}{'judge':>22}{'people':>22}")
    for name, judge, people, note in rows:
        shares = [f"{_pct(report[who]['rate'])} of {report[who]['of']}" for who in (judge, people)]
        lines.append(f"{name:<30}{shares[0]:>22}{shares[1]:>22}  {note}".rstrip())
    lines.append(f"{'win rate of ' + report['model']:<30}{_pct(report['judge_win_rate']):>22}"
                 f"{_pct(report['people_win_rate']):>22}  95 % CI: judge {_ci(report['judge_win_rate_ci'])}, "
                 f"people {_ci(report['people_win_rate_ci'])}")
    lines.append(f"{'length/style-controlled':<30}{_pct(report['judge_lc_win_rate']):>22}"
                 f"{_pct(report['people_sc_win_rate']):>22}  judge: AlpacaEval 2's length control; people: "
                 f"Chatbot Arena's style control (95 % CI {_ci(report['people_sc_win_rate_ci'])})")
    return "\n".join(lines)


def plot_agreement(report: dict, path) -> str:
    """The confusion matrix (counts, and each judge row's share) and the position and length preferences of the
    judge and the people side by side, as a PNG. matplotlib's Figure, not pyplot: no global state."""
    from matplotlib.figure import Figure

    counts = np.array(report["confusion"])
    fig = Figure(figsize=(10, 4.2))
    matrix_ax, bars_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.1]})
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)
    image = matrix_ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(3):
        for j in range(3):
            matrix_ax.text(j, i, f"{counts[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=9,
                           color="white" if share[i, j] > 0.6 else "black")
    names = [f"{report['model']}\nwon", "tie", f"{report['baseline']}\nwon"]
    matrix_ax.set_xticks(range(3), names)
    matrix_ax.set_yticks(range(3), names)
    matrix_ax.set_xlabel("people")
    matrix_ax.set_ylabel("judge")
    kappa = "-" if report["kappa"] is None else f"{report['kappa']:.2f}"
    matrix_ax.set_title(f"agreement {_pct(report['agreement'])} with ties, "
                        f"{_pct(report['agreement_without_ties'])} without; κ {kappa}", fontsize=9)
    fig.colorbar(image, ax=matrix_ax, fraction=0.046)

    groups = [("first answer won", "first_position"), ("longer answer won", "longer_answer")]
    x = np.arange(len(groups))
    for offset, who, color in ((-0.18, "judge", "tab:orange"), (0.18, "people", "tab:blue")):
        values = [report[f"{who}_{key}"]["rate"] for _, key in groups]
        heights = [100 * v if v is not None else 0 for v in values]
        bars = bars_ax.bar(x + offset, heights, 0.36, label=who, color=color)
        bars_ax.bar_label(bars, [f"{h:.0f} %" if v is not None else "-" for h, v in zip(heights, values)])
    bars_ax.axhline(50, color="gray", linestyle="--", linewidth=1)
    bars_ax.set_xticks(x, [name for name, _ in groups])
    bars_ax.set_ylim(0, 110)
    bars_ax.set_ylabel("% of decisive verdicts / votes")
    bars_ax.legend(loc="upper right")
    bars_ax.set_title(f"{report['votes']} votes, {report['prompts']} prompts", fontsize=9)
    fig.suptitle(f"Judge {report.get('judge') or ''} vs people: {report['model']} vs {report['baseline']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return str(path)
