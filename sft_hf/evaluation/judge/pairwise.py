"""Pairwise verdicts, MT-bench / AlpacaEval style: which of two responses to the same instruction is better?

Every pair is judged twice, once with the model's response as assistant A and once with the baseline's as A; as in
MT-bench, a verdict counts only when both orders agree, otherwise the pair is a tie. How often the orders agree
(position consistency) and how often the first position won say how far the judge follows order, not content.
Two identical responses are a tie without asking the judge, as in AlpacaEval.
The prompt is MT-bench's (pair-math-v1, with the reference answer, when the record has one; pair-v2 otherwise),
asking for "[[A]]", "[[B]]" or "[[C]]" (a tie); where the server takes structured output the reply is
{"winner": "A" | "B" | "tie"} (VERDICT_SCHEMA) instead. Asking goes through runner.py (cache and resume,
concurrency, retries, the text fallback); replies without a verdict are kept and counted, never dropped. The
statistics (win rate, bootstrap interval, length-controlled win rate) are in sft_hf/evaluation/win_rate.py.
"""
from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sft_hf.evaluation.judge.prompts import format_input
from sft_hf.evaluation.judge.runner import ask_all
from sft_hf.evaluation.responses import join_by_prompt
from sft_hf.evaluation.win_rate import plot_pairwise, summarize_outcomes
from sft_hf.templates import reference_answer

# MT-bench's pair prompts (FastChat llm_judge/data/judge_prompts.jsonl), system prompt and template as one user
# message, since every judge client sends one. {question} is `format_input(record)`, as for the 0-100 judge.
_MT_BENCH_END = (
    "Avoid any positional biases and ensure that the order in which the responses were presented does not influence "
    "your decision. Do not allow the length of the responses to influence your evaluation. Do not favor certain names "
    "of the assistants. Be as objective as possible. After providing your explanation, output your final verdict by "
    'strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" '
    "for a tie.\n\n"
)
_ANSWERS = (
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
PAIRWISE_PROMPT = (  # pair-v2
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below. You should choose the assistant that follows the user's instructions and answers "
    "the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, "
    "accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by comparing the two "
    "responses and provide a short explanation. " + _MT_BENCH_END + "[User Question]\n{question}\n\n" + _ANSWERS
)
PAIRWISE_REFERENCE_PROMPT = (  # pair-math-v1: the record's reference answer shown too, as chapter 7's judge does
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below. Your evaluation should consider correctness and helpfulness. You will be given a "
    "reference answer, assistant A's answer, and assistant B's answer. Your job is to evaluate which assistant's "
    "answer is better. Begin your evaluation by comparing both assistants' answers with the reference answer. "
    "Identify and correct any mistakes. " + _MT_BENCH_END + "[User Question]\n{question}\n\n"
    "[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n" + _ANSWERS
)

# What a structured judge must answer: exactly {"winner": "A"}, {"winner": "B"} or {"winner": "tie"}. HFJudge ranks
# the three enumerated answers; Ollama and OpenAI-compatible servers constrain decoding to the schema.
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["winner"],
    "additionalProperties": False,
}
ORDERS = ("model first", "baseline first")  # who is assistant A in each of a pair's two prompts
PAIRWISE_CACHE = "pairwise_cache.jsonl"  # in the output folder: the judge's answers, for resuming


@dataclass
class ParsedVerdict:
    verdict: str | None  # "A", "B" or "tie" (the position that won); None: no verdict
    problem: str | None = None  # why not: "no verdict", "ambiguous", "invalid JSON", ...


_BRACKETED = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_BARE = re.compile(r"^\W*(A|B|C|[Tt]ie)\W*$")  # a reply that is nothing but the verdict: "A", "[B]", "Tie."
TEXT_VERDICTS = {"A": "A", "B": "B", "C": "tie", "tie": "tie", "Tie": "tie"}


def parse_verdict(reply: str) -> ParsedVerdict:
    """MT-bench's "[[A]]" / "[[B]]" / "[[C]]" anywhere in the reply, or a reply that is only the verdict. Two
    different bracketed verdicts ("[[A]] ... no, [[B]]") are ambiguous: counted, not guessed."""
    found = {m.group(1) for m in _BRACKETED.finditer(reply or "")}
    if len(found) > 1:
        return ParsedVerdict(None, "ambiguous")
    if found:
        return ParsedVerdict(TEXT_VERDICTS[found.pop()])
    bare = _BARE.match((reply or "").strip())
    return ParsedVerdict(TEXT_VERDICTS[bare.group(1)]) if bare else ParsedVerdict(None, "no verdict")


def parse_structured_verdict(reply: str) -> ParsedVerdict:
    """Validate a structured reply against VERDICT_SCHEMA."""
    try:
        value = json.loads(reply)
    except (json.JSONDecodeError, TypeError):
        return ParsedVerdict(None, "invalid JSON")
    if not isinstance(value, dict) or set(value) != {"winner"}:
        return ParsedVerdict(None, 'not {"winner": ...}')
    if value["winner"] not in ("A", "B", "tie"):
        return ParsedVerdict(None, "winner not A, B or tie")
    return ParsedVerdict(value["winner"])


def parse_verdict_reply(reply: str, asked: str) -> tuple[ParsedVerdict, str]:
    """The verdict and the path it came by: a reply asked as "json" is validated against the schema, unless it is
    not a JSON object (a server that ignored the format answered the text prompt, "[[A]]" included): that is parsed
    as "text"."""
    if asked == "json" and (reply or "").lstrip()[:1] == "{":
        return parse_structured_verdict(reply), "json"
    return parse_verdict(reply), "text"


# ---------------------------------------------------------------------------------------------------------------
# Pairs


@dataclass
class Pair:
    """One instruction and two responses to it: the model's and the baseline's, with where each came from."""

    record: dict  # the model side's record: the instruction and input (or messages) and the reference answer
    model_response: str
    baseline_response: str
    model_index: int  # the record's index in its file
    baseline_index: int


def reference_of(record: dict) -> str:
    """The reference answer, or "" for a record without one."""
    return reference_answer(record) if (record.get("messages") or "output" in record) else ""


def pairs_from_columns(records: list[dict], model_key: str, baseline_key: str) -> list[Pair]:
    """Two response fields of one file, e.g. chapter 7's "model 1 response" and "model 2 response"."""
    return [Pair(r, r[model_key], r[baseline_key], i, i) for i, r in enumerate(records)]


def join_responses(model_records: list[dict], baseline_records: list[dict], model_key: str, baseline_key: str,
                   model_file: str = "model file", baseline_file: str = "baseline file") -> list[Pair]:
    """Pairs in the model file's order, matched by instruction + input or a conversation's turns (the k-th repeat
    of an instruction with the k-th repeat in the other file; sft_hf/evaluation/responses.py, as the arena joins).
    Every record must have its counterpart: a DataError names those that do not."""
    rows = join_by_prompt([(model_file, model_records), (baseline_file, baseline_records)])
    return [Pair(model_records[i], model_records[i][model_key], baseline_records[j][baseline_key], i, j)
            for i, j in rows]


PAIRWISE_PROMPT_FIELDS = ("question", "reference", "answer_a", "answer_b")  # what --judge_prompt can name


def make_pair_prompt(record: dict, answer_a: str, answer_b: str, prompt_template: str | None = None) -> str:
    """MT-bench's prompt for one order; with the reference answer when the record has one."""
    reference = reference_of(record)
    if prompt_template is None:
        prompt_template = PAIRWISE_REFERENCE_PROMPT if reference.strip() else PAIRWISE_PROMPT
    return prompt_template.format(question=format_input(record), reference=reference, answer_a=answer_a,
                                  answer_b=answer_b)


def pair_prompts(pair: Pair, prompt_template: str | None = None) -> tuple[str, str]:
    """The pair's two prompts, in ORDERS: the model's response as assistant A, then the baseline's."""
    return (make_pair_prompt(pair.record, pair.model_response, pair.baseline_response, prompt_template),
            make_pair_prompt(pair.record, pair.baseline_response, pair.model_response, prompt_template))


# ---------------------------------------------------------------------------------------------------------------
# Judging


def identical(pair: Pair) -> bool:
    return pair.model_response.strip() == pair.baseline_response.strip()


def side_that_won(verdict: str | None, order: str) -> str | None:
    """"model", "baseline" or "tie" from the position that won ("A", "B", "tie") in one order."""
    if verdict in (None, "tie"):
        return verdict
    model_is_a = order == ORDERS[0]
    return "model" if (verdict == "A") == model_is_a else "baseline"


def combine(first: str | None, second: str | None) -> tuple[str | None, bool | None]:
    """(the pair's winner, whether the two orders agreed): MT-bench's rule, a verdict counts only when both orders
    give it, otherwise a tie. A missing verdict in either order leaves the pair without one (counted, not guessed)."""
    if first is None or second is None:
        return None, None
    return (first, True) if first == second else ("tie", False)


def judge_pairs(pairs: list[Pair], judge, cache_path: str | Path | None = None, judge_format: str = "auto",
                max_workers: int = 4, retries: int = 4, backoff: float = 1.0, show_progress: bool = True,
                prompt_template: str | None = None, desc: str = "Judging pairs") -> list[dict]:
    """One result per pair, in order: both orders' replies and parsed verdicts, and the combined verdict.

    Each result: index, model_index, baseline_index, winner ("model", "baseline", "tie" or None: no verdict),
    consistent (the two orders agreed; None unless both have a verdict), identical, and `orders`, one per ORDERS:
    order, reply (None if the request failed), verdict (the position that won: "A", "B", "tie" or None), winner
    (the side that won in that order), path ("json" or "text") and problem (why there is no verdict, else None).
    Two identical responses (whitespace aside) are a tie without asking, as in AlpacaEval: no `orders`. (Asked,
    both orders are the same prompt, and a server that answers it differently twice would invent a winner.)
    """
    judged = [i for i, pair in enumerate(pairs) if not identical(pair)]
    prompts = [prompt for i in judged for prompt in pair_prompts(pairs[i], prompt_template)]
    answered, failures = ask_all(prompts, judge, VERDICT_SCHEMA, cache_path, judge_format, max_workers, retries,
                                 backoff, show_progress, desc=desc)
    item_of = {i: 2 * n for n, i in enumerate(judged)}  # pair index -> its first prompt's index
    results = []
    for i, pair in enumerate(pairs):
        if i not in item_of:
            results.append({"index": i, "model_index": pair.model_index, "baseline_index": pair.baseline_index,
                            "winner": "tie", "consistent": None, "identical": True, "orders": []})
            continue
        orders = []
        for k, order in enumerate(ORDERS):
            item = item_of[i] + k
            if item in failures:
                orders.append({"order": order, "reply": None, "verdict": None, "winner": None, "path": None,
                               "problem": failures[item]})
                continue
            reply, asked = answered[item]
            parsed, path = parse_verdict_reply(reply, asked)
            orders.append({"order": order, "reply": reply, "verdict": parsed.verdict,
                           "winner": side_that_won(parsed.verdict, order), "path": path, "problem": parsed.problem})
        winner, consistent = combine(orders[0]["winner"], orders[1]["winner"])
        results.append({"index": i, "model_index": pair.model_index, "baseline_index": pair.baseline_index,
                        "winner": winner, "consistent": consistent, "identical": False, "orders": orders})
    return results


def position_stats(results: list[dict]) -> dict:
    """How far verdicts follow position: the share of pairs whose two orders agree (of those judged with both
    verdicts: not the identical ones), and the shares of single-order verdicts won by the first position, the
    second, or tied."""
    both = [r for r in results if r["consistent"] is not None]
    verdicts = collections.Counter(o["verdict"] for r in results for o in r["orders"] if o["verdict"] is not None)
    total = sum(verdicts.values())
    share = (lambda n: n / total) if total else (lambda n: None)
    return {
        "consistency": sum(r["consistent"] for r in both) / len(both) if both else None,
        "num_consistent": sum(r["consistent"] for r in both),
        "num_both_orders": len(both),
        "first_position_rate": share(verdicts["A"]),
        "second_position_rate": share(verdicts["B"]),
        "single_order_tie_rate": share(verdicts["tie"]),
        "num_single_verdicts": total,
        "num_identical": sum(r["identical"] for r in results),
    }


def summarize_pairs(results: list[dict], pairs: list[Pair], bootstrap_samples: int = 1000, seed: int = 0) -> dict:
    """Win/tie/loss counts, win rate and length-controlled win rate with bootstrap intervals (pairs with a combined
    verdict), mean response lengths in characters (all pairs), position bias, and the pairs without a verdict."""
    decided = [r for r in results if r["winner"] is not None]
    outcome = {"model": 1.0, "tie": 0.5, "baseline": 0.0}
    rates = summarize_outcomes([outcome[r["winner"]] for r in decided],
                               [len(pairs[r["index"]].model_response) for r in decided],
                               [len(pairs[r["index"]].baseline_response) for r in decided],
                               bootstrap_samples, seed).to_dict()
    n = len(pairs)
    paths = collections.Counter(o["path"] for r in results for o in r["orders"] if o["verdict"] is not None)
    return {
        **rates,
        "num_items": n,
        # the lengths of every pair (the fit above used those with a verdict)
        "mean_length_model": sum(len(p.model_response) for p in pairs) / n if n else None,
        "mean_length_baseline": sum(len(p.baseline_response) for p in pairs) / n if n else None,
        "length_unit": "characters",
        **position_stats(results),
        "verdict_paths": dict(sorted(paths.items())),
        "undecided": [{"index": r["index"], "problems": [f"{o['order']}: {o['problem']}" for o in r["orders"]
                                                         if o["verdict"] is None]}
                      for r in results if r["winner"] is None],
    }


def _percent(rate) -> str:
    return "-" if rate is None else f"{100 * rate:.1f} %"


def _interval(ci) -> str:
    return f"95 % CI {100 * ci[0]:.1f} to {100 * ci[1]:.1f}" if ci else ""


def format_pairwise_summary(summary: dict, model_name: str = "model", baseline_name: str = "baseline") -> str:
    """The small table a person reads: who won how often, the win rates, and how far the judge followed position."""
    width = max(len(model_name), len(baseline_name), 8) + 2
    label = max(30, len(model_name) + 14)  # "win rate of <model>" fits
    n, decided = summary["num_items"], summary["num_pairs"]
    paths = ", ".join(f"{path} {k}" for path, k in summary["verdict_paths"].items()) or "none"
    identical = summary["num_identical"]
    lines = [
        f"Pairwise judge: {model_name!r} vs {baseline_name!r}, {n} pairs: {n - identical} judged in both orders "
        f"({summary['num_single_verdicts']} verdicts: {paths})" + (f", {identical} identical (ties)" if identical else ""),
        f"{'':<{label}}{model_name:>{width}}{baseline_name:>{width}}",
        f"{'pairs won':<{label}}{summary['wins']:>{width}}{summary['losses']:>{width}}",
    ]
    if summary["mean_length_model"] is not None:
        lines.append(f"{'mean length (characters)':<{label}}{summary['mean_length_model']:>{width}.1f}"
                     f"{summary['mean_length_baseline']:>{width}.1f}")
    rows = [
        ("ties", f"{summary['ties']}", "the two orders disagreed, or both said tie"
         + (f"; {identical} identical pairs, not asked" if identical else "")),
        (f"win rate of {model_name}", _percent(summary["win_rate"]),
         f"{_interval(summary['win_rate_ci'])}  ({decided} of {n} pairs with a verdict)"),
        ("length-controlled win rate", _percent(summary["lc_win_rate"]), _interval(summary["lc_win_rate_ci"])),
        ("position consistency", _percent(summary["consistency"]),
         f"{summary['num_consistent']} of {summary['num_both_orders']} pairs: both orders agreed"),
        ("first position won", _percent(summary["first_position_rate"]),
         f"of {summary['num_single_verdicts']} single-order verdicts (second {_percent(summary['second_position_rate'])}"
         f", tie {_percent(summary['single_order_tie_rate'])})"),
    ]
    lines += [f"{name:<{label}}{value:>{width}}  {note}".rstrip() for name, value, note in rows]
    for item in summary["undecided"][:10]:
        lines.append(f"  no verdict for pair {item['index']}: " + "; ".join(item["problems"]))
    if len(summary["undecided"]) > 10:
        lines.append(f"  and {len(summary['undecided']) - 10} more pairs without a verdict")
    return "\n".join(lines)


def run_pairwise(pairs: list[Pair], judge, output_dir: str | Path, model_name: str = "model",
                 baseline_name: str = "baseline", judge_format: str = "auto", max_workers: int = 4, retries: int = 4,
                 backoff: float = 1.0, show_progress: bool = True, bootstrap_samples: int = 1000, seed: int = 0,
                 prompt_template: str | None = None) -> dict:
    """Judge every pair in both orders, print the summary, write pairwise_verdicts.json, pairwise_summary.json and
    pairwise_win_rate.png; answers are cached in PAIRWISE_CACHE (a rerun resumes from it)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = judge_pairs(pairs, judge, output_dir / PAIRWISE_CACHE, judge_format, max_workers, retries,
                          backoff, show_progress, prompt_template, desc=f"Judging {model_name} vs {baseline_name}")
    summary = {"model": model_name, "baseline": baseline_name, "judge": judge.identity, "judge_format": judge_format,
               **summarize_pairs(results, pairs, bootstrap_samples, seed)}
    print("\n" + format_pairwise_summary(summary, model_name, baseline_name))
    per_pair = []
    for result, pair in zip(results, pairs):
        question = {k: pair.record[k] for k in ("instruction", "input", "messages") if k in pair.record}
        per_pair.append({**result, **question, "reference": reference_of(pair.record),
                         "model_response": pair.model_response, "baseline_response": pair.baseline_response})
    verdicts = {"model": model_name, "baseline": baseline_name, "judge": judge.identity, "pairs": per_pair}
    (output_dir / "pairwise_verdicts.json").write_text(json.dumps(verdicts, indent=2) + "\n")
    (output_dir / "pairwise_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_pairwise(summary, output_dir / "pairwise_win_rate.png")
    return summary
