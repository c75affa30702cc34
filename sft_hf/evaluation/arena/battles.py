"""What the arena puts side by side: saved responses (one JSON file or column per model, joined by instruction and
input) or live answers (local model folders, OpenAI-compatible servers), and the battles drawn from them.

A Battle lives on the server only (the page's gr.State): the browser gets the two responses and never a model name
until its vote is stored. Which model sits on the left is drawn at random for every battle (seedable).
"""
from __future__ import annotations

import json
import logging
import random
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from sft_hf.errors import DataError, RecipeError

logger = logging.getLogger(__name__)

DEFAULT_COLUMN = "model_response"  # what recipes/evaluate.py writes


@dataclass
class Battle:
    battle_id: str
    instruction: str
    input: str
    model_a: str  # left
    model_b: str  # right
    response_a: str
    response_b: str
    source: str  # "files" or "live"


# ---------------------------------------------------------------------------------------------- saved responses

@dataclass
class ResponseColumn:
    """One model's saved responses: `name=path.json` (the model_response field) or `name=path.json:column`."""
    name: str
    path: Path
    column: str = DEFAULT_COLUMN

    @classmethod
    def parse(cls, spec: str) -> "ResponseColumn":
        name, sep, location = spec.partition("=")
        if not sep:
            name, location = "", spec
        path, column = Path(location), DEFAULT_COLUMN
        if not path.is_file() and ":" in location:  # path.json:column (a path that itself holds ':' wins)
            head, column = location.rsplit(":", 1)
            path = Path(head)
        if not path.is_file():
            raise RecipeError(f"--responses {spec}: no such file {str(path)!r} (use name=file.json or "
                              f"name=file.json:column)")
        # unnamed: the column, else the file's name, else for recipes/evaluate.py's file its folder (outputs/base)
        default_name = column if column != DEFAULT_COLUMN else \
            path.resolve().parent.name if path.stem == "test_responses" else path.stem
        return cls(name.strip() or default_name, path, column)

    @property
    def label(self) -> str:
        return f"{self.name}={self.path}" + (f":{self.column}" if self.column != DEFAULT_COLUMN else "")


@dataclass
class Prompt:
    instruction: str
    input: str
    responses: dict[str, str]  # model name → its response


def read_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON{'L' if path.suffix == '.jsonl' else ''} (line {e.lineno}: "
                        f"{e.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def prompt_key(record: dict) -> tuple[str, str]:
    return record["instruction"], record.get("input") or ""


def describe(key: tuple[str, str], index: int) -> str:
    instruction, input_ = key
    short = instruction if len(instruction) <= 60 else instruction[:57] + "..."
    return f"record {index} (instruction {short!r}" + (f", input {input_[:40]!r})" if input_ else ")")


def load_response_columns(columns: list[ResponseColumn]) -> list[Prompt]:
    """The prompts every column answers, each with every model's response. Records are joined by instruction and
    input (the k-th repeat of a prompt with the k-th); a record without a partner in every other column is an
    error that names it."""
    names = Counter(c.name for c in columns)
    if dupes := [n for n, k in names.items() if k > 1]:
        raise RecipeError(f"--responses: the model name {dupes[0]!r} is given twice: name each source, "
                          "e.g. base=a.json tuned=b.json")
    tables = {}  # name → {(instruction, input, repeat): (record index, response)}
    cache: dict[Path, list] = {}
    for col in columns:
        records = cache.setdefault(col.path, read_records(col.path))
        seen: Counter = Counter()
        table = tables[col.name] = {}
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{col.path}: record {i}: expected an object with fields, got {type(record).__name__}")
            if "messages" in record and "instruction" not in record:
                raise DataError(f"{col.path}: record {i}: a conversation (messages); the arena compares "
                                "single-turn records with instruction and input")
            for key in ("instruction", col.column):
                if not isinstance(record.get(key), str):
                    raise DataError(f"{col.path}: record {i}, field {key!r}: missing or not text "
                                    f"(fields: {sorted(record)})")
            if not isinstance(record.get("input") or "", str):
                raise DataError(f"{col.path}: record {i}, field 'input': not text")
            key = prompt_key(record)
            table[(*key, seen[key])] = (i, record[col.column])
            seen[key] += 1
        if not table:
            raise DataError(f"{col.path}: no records")
    first, *others = columns
    problems = []
    for col in others:
        for a, b in ((first, col), (col, first)):
            missing = [tables[a.name][k][0] for k in tables[a.name] if k not in tables[b.name]]
            if missing:
                keys = {v[0]: k[:2] for k, v in tables[a.name].items()}
                named = "; ".join(describe(keys[i], i) for i in missing[:3])
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                problems.append(f"{len(missing)} record(s) of {a.label} have no match in {b.label}: {named}{more}")
    if problems:
        raise DataError("responses not joined by instruction + input: " + " | ".join(problems))
    prompts = []
    for key in tables[first.name]:
        prompts.append(Prompt(key[0], key[1], {c.name: tables[c.name][key][1] for c in columns}))
    return prompts


class BattleDeck:
    """Battles from saved responses: every (prompt, pair of models) once in a shuffled order, then again
    reshuffled, so votes spread evenly over prompts and pairs. Thread-safe: one deck serves every voter."""

    def __init__(self, prompts: list[Prompt], models: list[str], rng: random.Random):
        self.prompts, self.models, self.rng = prompts, models, rng
        self.deck: list[tuple[int, tuple[str, str]]] = []
        self.lock = threading.Lock()

    def draw(self) -> Battle:
        with self.lock:
            if not self.deck:
                self.deck = [(p, pair) for p in range(len(self.prompts)) for pair in combinations(self.models, 2)]
                self.rng.shuffle(self.deck)
            p, pair = self.deck.pop()
            left, right = self.rng.sample(pair, 2)  # which model sits on the left: random per battle
        prompt = self.prompts[p]
        return Battle(new_battle_id(), prompt.instruction, prompt.input, left, right, prompt.responses[left],
                      prompt.responses[right], "files")


def new_battle_id() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------------------------- live models

@dataclass
class LocalModel:
    """A local model folder (transformers), greedy, with the template it was trained with."""
    name: str
    path: str
    template: str | None = None  # None: the folder's sft_template.json, else alpaca
    max_new_tokens: int = 256
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one generation at a time

    def load(self) -> "LocalModel":
        from sft_hf.modeling import load_model, load_tokenizer, resolve_model_path
        from sft_hf.run.config import ModelArguments
        from sft_hf.run.outputs import load_template

        folder = resolve_model_path(self.path)
        if Path(folder, "adapter_config.json").is_file():
            raise RecipeError(f"--model {self.name}={self.path}: a LoRA adapter; fold it into its base model first "
                              f"(sft-hf merge-lora) and give that folder")
        args = ModelArguments(model_name_or_path=self.path)
        self.tokenizer = load_tokenizer(args)
        self.model = load_model(args, self.tokenizer).eval()
        self.prompt_template = load_template(folder, self.template)  # as recipes/evaluate.py chooses it
        return self

    def answer(self, prompt: str) -> str:
        from sft_hf.evaluation.generation import generate_responses

        with self.lock:
            return generate_responses(self.model, self.tokenizer, [{"instruction": prompt, "input": ""}],
                                      self.prompt_template, self.max_new_tokens, batch_size=1,
                                      show_progress=False)[0]


@dataclass
class ServerModel:
    """A model behind an OpenAI-compatible server: `name=model@http://host:port/v1`, asked through the judge's
    client (no redirects, no proxies, the key read from an environment variable at request time)."""
    name: str
    client: object  # OpenAIJudge

    @classmethod
    def parse(cls, spec: str, api_key_env: str = "OPENAI_API_KEY", max_tokens: int | None = None) -> "ServerModel":
        from sft_hf.evaluation.judge.clients import OpenAIJudge

        name, sep, rest = spec.partition("=")
        model, _, url = rest.partition("@")
        if not sep or not name.strip() or not model.strip():
            raise RecipeError(f"--openai {spec}: use name=model@http://host:port/v1 (the URL defaults to "
                              "http://localhost:8000/v1)")
        url = url.strip() or "http://localhost:8000/v1"
        if not url.startswith(("http://", "https://")) or "@" in url.split("//", 1)[1].split("/", 1)[0]:
            raise RecipeError(f"--openai {spec}: the URL must be http(s)://host:port/v1, without credentials "
                              f"(the key comes from ${api_key_env})")
        return cls(name.strip(), OpenAIJudge(model=model.strip(), url=url, api_key_env=api_key_env,
                                             max_tokens=max_tokens))

    def answer(self, prompt: str) -> str:
        return self.client.complete(prompt)


class LiveModelsFailed(RuntimeError):
    """A live model could not answer; the message is safe to show the voter (it names no model)."""


def live_battle(prompt: str, models: list, rng: random.Random, rng_lock: threading.Lock) -> Battle:
    """Two of the live models, drawn at random (and their sides), answer the voter's prompt at the same time."""
    with rng_lock:
        left, right = rng.sample(models, 2)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(m.answer, prompt) for m in (left, right)]
        answers, errors = [], []
        for model, future in zip((left, right), futures):
            try:
                answers.append(future.result())
            except Exception as e:  # noqa: BLE001 - any failure: logged with the name, the voter sees none
                logger.error("live model %s failed: %s", model.name, e)
                errors.append(e)
    if errors:
        raise LiveModelsFailed(f"{len(errors)} of the two models failed to answer (details in the server log); "
                               "try again")
    return Battle(new_battle_id(), prompt, "", left.name, right.name, answers[0], answers[1], "live")
