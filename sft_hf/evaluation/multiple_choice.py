"""Multiple-choice knowledge benchmarks (MMLU and the like) through lm-evaluation-harness.

Two ways in:
- `run_benchmarks(model_dir, ["mmlu"])`: any task lm-eval knows (it needs the task's dataset: Hub or cache),
- `run_local_mc(model_dir, "questions.jsonl")`: an MMLU-format file, offline. Records have `question`, `choices`
  (a list, or columns `A`/`B`/`C`/`D`), `answer` (index or letter) and optionally `subject` and `split`
  (`dev` rows are the few-shot examples, as in MMLU). Each subject becomes an lm-eval task with MMLU's prompt,
  all of them one group, so lm-eval reports accuracy per subject and over all questions.
"""
from __future__ import annotations

import collections
import json
import re
import tempfile
from pathlib import Path

import yaml

from sft_hf.errors import UserError

LETTERS = "ABCDEFGHIJ"
GROUP = "sft_hf_mc"
# MMLU's prompt in lm-eval (tasks/mmlu/default/_default_template_yaml), for any number of choices.
DOC_TO_TEXT = (
    "{{question.strip()}}\n{% for choice in choices %}{{ 'ABCDEFGHIJ'[loop.index0] }}. {{choice}}\n{% endfor %}Answer:"
)


class MCDataError(UserError):
    pass


def read_mc_file(path: str | Path) -> list[dict]:
    """Records as {question, choices, answer: int, subject, split}, each checked (the error names record and field)."""
    path = Path(path)
    if not path.is_file():
        raise MCDataError(f"{path}: no such file")
    if path.suffix in (".json", ".jsonl"):
        from sft_hf.data import parse_json_records  # the training data's reader: bad lines named by line and column

        problems = []
        rows = [row for row, _ in parse_json_records(str(path), problems)]
        if problems:
            raise MCDataError(problems[0])
    elif path.suffix == ".csv":
        import csv

        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise MCDataError(f"{path}: use a .json, .jsonl or .csv file")
    records = []
    for i, row in enumerate(rows):
        where = f"{path}: record {i}"
        choices = row.get("choices") or [row[c] for c in LETTERS if row.get(c) not in (None, "")]
        if isinstance(choices, str):
            choices = json.loads(choices)
        if not isinstance(choices, list) or len(choices) < 2:
            raise MCDataError(f"{where}, field 'choices': needs a list of at least 2 answers (or columns A, B, ...)")
        answer = row.get("answer")
        if isinstance(answer, str) and answer.strip().upper() in LETTERS[: len(choices)]:
            answer = LETTERS.index(answer.strip().upper())
        elif isinstance(answer, str) and answer.strip().isdigit():
            answer = int(answer)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise MCDataError(f"{where}, field 'answer': {row.get('answer')!r} is not an index or letter of a choice")
        if not str(row.get("question", "")).strip():
            raise MCDataError(f"{where}, field 'question': missing or empty")
        records.append({"question": str(row["question"]), "choices": [str(c) for c in choices], "answer": answer,
                        "subject": str(row.get("subject") or "all"), "split": str(row.get("split") or "test")})
    return records


def write_local_tasks(records: list[dict], folder: str | Path) -> list[str]:
    """One lm-eval task per subject (data + YAML) and a group over them in `folder`; returns the task names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for subject in sorted({r["subject"] for r in records}):
        slug = re.sub(r"\W+", "_", subject).strip("_").lower() or "all"
        files = {}
        for split in ("test", "dev"):
            rows = [r for r in records if r["subject"] == subject and r["split"] == split]
            if rows:
                files[split] = str(folder / f"{slug}_{split}.jsonl")
                Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        if "test" not in files:
            continue
        name, topic = f"{GROUP}_{slug}", subject.replace("_", " ")
        config = {
            "task": name, "task_alias": subject, "tag": f"{GROUP}_tasks",
            "dataset_path": "json", "dataset_kwargs": {"data_files": files},
            "test_split": "test", "fewshot_split": "dev" if "dev" in files else "test",
            "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "description": f"The following are multiple choice questions (with answers) about {topic}.\n\n",
            "doc_to_text": DOC_TO_TEXT,
            "doc_to_choice": "{{ 'ABCDEFGHIJ'[:choices|length]|list }}",
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        names.append(name)
    group = {"group": GROUP, "task": names,
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 1.0}}
    (folder / f"_{GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return names


def run_benchmarks(
    model: str, tasks: list[str], num_fewshot: int | None = None, batch_size: int = 8, limit: int | None = None,
    device: str | None = None, include_path: str | None = None, include_defaults: bool = True, dtype: str = "auto",
) -> dict:
    """lm-eval's `simple_evaluate` on a local model folder; returns {task: {"acc", "acc_stderr", "alias"}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model), "dtype": dtype}, tasks=tasks, num_fewshot=num_fewshot,
        batch_size=batch_size, device=device, limit=limit, task_manager=manager, log_samples=False,
    )
    results = {}
    for task, metrics in out["results"].items():
        if "acc,none" in metrics:
            results[task] = {"alias": metrics.get("alias", task).strip(" -"), "acc": metrics["acc,none"],
                             "acc_stderr": metrics.get("acc_stderr,none")}
    return results


def run_local_mc(model: str, task_file: str | Path, num_fewshot: int = 0, batch_size: int = 8,
                 limit: int | None = None, device: str | None = None, work_dir: str | None = None) -> dict:
    """Accuracy per subject and overall on an MMLU-format file, offline.

    Returns {"subjects": {subject: acc}, "overall": acc over all questions, "num_questions": n}.
    """
    records = read_mc_file(task_file)
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        write_local_tasks(records, folder)
        results = run_benchmarks(model, [GROUP], num_fewshot=num_fewshot, batch_size=batch_size, limit=limit,
                                 device=device, include_path=folder, include_defaults=False, dtype="float32")
    subjects = {r["alias"]: r["acc"] for task, r in results.items() if task != GROUP}
    per_subject = collections.Counter(r["subject"] for r in records if r["split"] == "test")
    # lm-eval's `limit` caps each subject's task: the questions actually asked
    asked = sum(n if limit is None else min(n, int(limit)) for n in per_subject.values())
    return {"subjects": subjects, "overall": results[GROUP]["acc"], "num_questions": asked}


def format_mc_results(results: dict) -> str:
    width = max([len(s) for s in results["subjects"]] + [7]) + 2
    lines = [f"{'subject':<{width}} accuracy"]
    lines += [f"{s:<{width}} {acc:.4f}" for s, acc in sorted(results["subjects"].items())]
    lines.append(f"{'overall':<{width}} {results['overall']:.4f}  ({results['num_questions']} questions)")
    return "\n".join(lines)


def format_mc_comparison(results: dict[str, dict]) -> str:
    """Accuracy per subject and overall, one column per model (e.g. before and after fine-tuning)."""
    subjects = sorted(set().union(*(r["subjects"] for r in results.values())))
    width = max([len(s) for s in subjects] + [7]) + 2
    columns = [max(len(name), 8) for name in results]
    lines = [f"{'subject':<{width}}" + " ".join(f"{name:>{w}}" for name, w in zip(results, columns))]
    for subject in subjects + ["overall"]:
        values = [r["overall"] if subject == "overall" else r["subjects"].get(subject) for r in results.values()]
        lines.append(f"{subject:<{width}}" + " ".join("-".rjust(w) if v is None else f"{v:>{w}.4f}"
                                                      for v, w in zip(values, columns)))
    return "\n".join(lines)
