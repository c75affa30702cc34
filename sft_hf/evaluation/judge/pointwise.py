"""Score responses 0-100 with an LLM judge, as chapter 7 does with Llama 3 through Ollama.

`judge_responses` asks the judge (clients.py) for every record through runner.py: bounded concurrency, retries with
exponential backoff and an on-disk JSONL cache (one line per answered item), so an interrupted run resumes without
asking again. `judge_format="json"` asks for {"score": <integer 0-100>} (SCORE_SCHEMA) as structured output;
chapter 7's prompt stays the same. Replies that hold no usable integer are kept and counted as unparsed, never
silently dropped; structured replies are validated against the schema, and every result says which path ("json" or
"text") its score came by.
"""
from __future__ import annotations

import collections
import json
import re
import statistics
from pathlib import Path

from sft_hf.evaluation.judge.prompts import JUDGE_PROMPT, make_judge_prompt
from sft_hf.evaluation.judge.runner import ask_all
from sft_hf.evaluation.judge.scoring import SCORE_SCHEMA, parse_reply


def judge_responses(
    records: list[dict], judge, response_key: str = "model_response", prompt_template: str = JUDGE_PROMPT,
    cache_path: str | Path | None = None, max_workers: int = 4, retries: int = 4, backoff: float = 1.0,
    show_progress: bool = True, judge_format: str = "auto",
) -> list[dict]:
    """One result per record, in order: index, score (int or None), reply, problem (why unscored, else None) and
    path ("json": a schema-valid structured reply, "text": chapter 7's prompt answered in prose; None if no reply).

    judge_format: "json" asks for {"score": int} (structured output), "text" for chapter 7's integer in prose,
    "auto" for JSON where the server takes it and text where it refuses (a 4xx).
    """
    prompts = [make_judge_prompt(r, response_key, prompt_template) for r in records]
    answered, failures = ask_all(prompts, judge, SCORE_SCHEMA, cache_path, judge_format, max_workers, retries,
                                 backoff, show_progress, desc=f"Judging {response_key}")
    results = []
    for i in range(len(records)):
        if i in failures:
            results.append({"index": i, "score": None, "reply": None, "problem": failures[i], "path": None})
            continue
        reply, asked = answered[i]
        parsed, path = parse_reply(reply, asked)
        results.append({"index": i, "score": parsed.score, "reply": reply, "problem": parsed.problem, "path": path})
    return results


def summarize(results: list[dict]) -> dict:
    scores = [r["score"] for r in results if r["score"] is not None]
    return {
        "num_items": len(results),
        "num_scores": len(scores),
        "average": sum(scores) / len(scores) if scores else None,
        "median": statistics.median(scores) if scores else None,
        "score_paths": dict(sorted(collections.Counter(r["path"] for r in results if r["score"] is not None).items())),
        "unscored": [{"index": r["index"], "reply": r["reply"], "problem": r["problem"]}
                     for r in results if r["score"] is None],
    }


def format_summary(summary: dict, label: str | None = None) -> str:
    """Chapter 7's two lines, plus the median and what could not be scored."""
    lines = [f"Scoring entries for {label!r}"] if label else []
    lines.append(f"Number of scores: {summary['num_scores']} of {summary['num_items']}")
    if summary["average"] is not None:
        lines.append(f"Average score: {summary['average']:.2f}")
        lines.append(f"Median score: {summary['median']:g}")
        lines.append("Scores by path: " + ", ".join(f"{path} {n}" for path, n in summary["score_paths"].items()))
    for item in summary["unscored"]:
        lines.append(f"  unscored item {item['index']}: {item['problem']} (reply {item['reply']!r})")
    return "\n".join(lines)


def plot_histogram(results_by_key: dict[str, list[dict]], path: str | Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = list(range(0, 101, 5))  # 20 bins; the last one, [95, 100], includes 100
    for key, results in results_by_key.items():
        ax.hist([r["score"] for r in results if r["score"] is not None], bins=bins, alpha=0.6, label=key)
    ax.set_xlabel("judge score")
    ax.set_ylabel("responses")
    ax.set_title("LLM judge scores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def compare_table(summaries: dict[str, dict]) -> str:
    """Two (or more) response columns judged on the same records, side by side."""
    width = max(len(k) for k in summaries) + 2
    lines = [f"{'responses':<{width}} {'scored':>9} {'average':>8} {'median':>7}"]
    for key, s in summaries.items():
        average = f"{s['average']:.2f}" if s["average"] is not None else "-"
        median = f"{s['median']:g}" if s["median"] is not None else "-"
        scored = f"{s['num_scores']}/{s['num_items']}"
        lines.append(f"{key:<{width}} {scored:>9} {average:>8} {median:>7}")
    return "\n".join(lines)


def run_judge(
    records: list[dict], judge, response_keys: list[str], output_dir: str | Path, prompt_template: str = JUDGE_PROMPT,
    max_workers: int = 4, retries: int = 4, backoff: float = 1.0, show_progress: bool = True,
    judge_format: str = "auto",
) -> dict[str, dict]:
    """Judge every response column, print chapter 7's summary, write per-item JSON, a histogram, a comparison."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_by_key, summaries = {}, {}
    for key in response_keys:
        slug = re.sub(r"\W+", "-", key).strip("-")
        results = judge_responses(records, judge, key, prompt_template, output_dir / f"judge_cache_{slug}.jsonl",
                                  max_workers, retries, backoff, show_progress, judge_format)
        results_by_key[key], summaries[key] = results, summarize(results)
        print("\n" + format_summary(summaries[key], key))
        per_item = [{**records[r["index"]], **{f"judge_{k}": v for k, v in r.items() if k != "index"}}
                    for r in results]
        (output_dir / f"judge_scores_{slug}.json").write_text(json.dumps(per_item, indent=2) + "\n")
    plot_histogram(results_by_key, output_dir / "judge_histogram.png")
    if len(summaries) > 1:
        print("\n" + compare_table(summaries))
    summary_file = {k: {**s, "judge": judge.identity, "judge_format": judge_format} for k, s in summaries.items()}
    (output_dir / "judge_summary.json").write_text(json.dumps(summary_file, indent=2) + "\n")
    return summaries
