"""What the arena puts side by side: saved responses (one JSON file or column per model, joined by instruction and
input) or live answers (local model folders, OpenAI-compatible servers), and the battles drawn from them.

A Battle lives on the server only (the page's gr.State): the browser gets the two responses and never a model name
until its vote is stored, and it is bound to the voter it was shown to. Which model sits on the left is drawn for
every battle from the system's randomness (random.SystemRandom: nothing a voter sees predicts the next draw), or
from --seed's generator when a repeatable arena is asked for.
"""
from __future__ import annotations

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
from sft_hf.evaluation.arena.votes import matchup_key
from sft_hf.evaluation.responses import check_responses, default_name, is_conversation, join_by_prompt, \
    prompt_turns, read_records

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
    served_to: str | None = None  # the voter it was shown to (Arena.voter_of: a login, or an anonymous session)

    @property
    def matchup(self) -> str:
        return matchup_key(self.instruction, self.input, self.model_a, self.model_b)


# ---------------------------------------------------------------------------------------------- saved responses

@dataclass
class ResponseColumn:
    """One model's saved responses: `name=path.json` (the model_response field) or `name=path.json:column`."""
    name: str
    path: Path
    column: str = DEFAULT_COLUMN

    @staticmethod
    def split(spec: str) -> tuple[str, Path, str]:
        """(name, file, column) of `name=file.json`, `name=file.json:column` or `file.json`; nothing checked."""
        name, sep, location = spec.partition("=")
        if not sep:
            name, location = "", spec
        path, column = Path(location), DEFAULT_COLUMN
        if not path.is_file() and ":" in location:  # path.json:column (a path that itself holds ':' wins)
            head, column = location.rsplit(":", 1)
            path = Path(head)
        return name, path, column

    @classmethod
    def parse(cls, spec: str) -> "ResponseColumn":
        name, path, column = cls.split(spec)
        if not path.is_file():
            raise RecipeError(f"--responses {spec}: no such file {str(path)!r} (use name=file.json or "
                              f"name=file.json:column)")
        # unnamed: the column, else the file's name (recipes/evaluate.py's test_responses.json: its run folder)
        unnamed = column if column != DEFAULT_COLUMN else default_name(path)
        return cls(name.strip() or unnamed, path, column)

    @property
    def label(self) -> str:
        return f"{self.name}={self.path}" + (f":{self.column}" if self.column != DEFAULT_COLUMN else "")


@dataclass
class Prompt:
    instruction: str
    input: str
    responses: dict[str, str]  # model name → its response


def shown_prompt(record: dict, where: str) -> tuple[str, str]:
    """The instruction and input the voter sees. The page shows one instruction, so a conversation is refused
    unless its only turn before the reply is the user's (earlier turns or a system message would be hidden)."""
    if not is_conversation(record):
        return record["instruction"], record.get("input") or ""
    turns = prompt_turns(record)
    if len(turns) != 1 or turns[0].get("role") != "user" or not isinstance(turns[0].get("content"), str):
        before = ", ".join(str(turn.get("role")) for turn in turns) or "nothing"
        raise DataError(f"{where}: a conversation with {before} before its reply; the arena shows the voter one "
                        "instruction, so it compares single-turn records (instruction and input, or one user message)")
    return turns[0]["content"], ""


def load_response_columns(columns: list[ResponseColumn]) -> list[Prompt]:
    """The prompts every column answers, each with every model's response. Records are joined by instruction and
    input (the k-th repeat of a prompt with the k-th, as the pairwise judge joins two files); a record without a
    partner in every other column is an error that names it."""
    names = Counter(c.name for c in columns)
    if dupes := [n for n, k in names.items() if k > 1]:
        raise RecipeError(f"--responses: the model name {dupes[0]!r} is given twice: name each source, "
                          "e.g. base=a.json tuned=b.json")
    sides, shown = [], []  # per column: (label, records), and its prompts as the voter would see them
    for col in columns:
        located = read_records(col.path)
        if not located:
            raise DataError(f"{col.path}: no records")
        check_responses(located, [col.column])
        shown.append([shown_prompt(record, where) for record, where in located])
        sides.append((col.label, [record for record, _ in located]))
    prompts = []
    for row in join_by_prompt(sides):  # one row per record of the first column: its partner's index in each
        responses = {col.name: records[j][col.column] for col, (_, records), j in zip(columns, sides, row)}
        prompts.append(Prompt(*shown[0][row[0]], responses))
    return prompts


def battle_rngs(seed: int | None) -> tuple[random.Random, random.Random]:
    """(the deck's generator, the live battles'): the system's randomness (os.urandom) without a seed, so no number
    of revealed battles predicts the next; with --seed one generator each, so each is guarded by its own user's
    lock, both from the one seed, so the battles drawn from saved responses are the same whether live ones come in
    between."""
    if seed is None:
        return random.SystemRandom(), random.SystemRandom()
    return random.Random(seed), random.Random(seed + 1)


class BattleDeck:
    """Battles from saved responses: every (prompt, pair of models) once in a shuffled order, then again
    reshuffled, so votes spread evenly over prompts and pairs. Thread-safe: one deck serves every voter. `rng` is
    the deck's own (battle_rngs), used under the deck's lock only."""

    def __init__(self, prompts: list[Prompt], models: list[str], rng: random.Random):
        self.prompts, self.models, self.rng = prompts, models, rng
        self.deck: list[tuple[int, tuple[str, str]]] = []
        self.lock = threading.Lock()
        self.size = len(prompts) * len(models) * (len(models) - 1) // 2  # matchups: prompts × pairs

    def matchup(self, card: tuple[int, tuple[str, str]]) -> str:
        prompt = self.prompts[card[0]]
        return matchup_key(prompt.instruction, prompt.input, *card[1])

    def draw(self, skip: set[str] = frozenset()) -> Battle | None:
        """The next battle whose matchup is not in `skip` (what this voter already voted on; the cards skipped
        stay in the deck for other voters), or None when the voter has voted on every one."""
        if len(skip) >= self.size and all(self.matchup((p, pair)) in skip for p in range(len(self.prompts))
                                           for pair in combinations(self.models, 2)):
            return None
        with self.lock:
            for _ in range(2):  # this pass's cards, then a new pass's
                if not self.deck:
                    self.deck = [(p, pair) for p in range(len(self.prompts)) for pair in combinations(self.models, 2)]
                    self.rng.shuffle(self.deck)
                found = next((k for k in range(len(self.deck) - 1, -1, -1)
                              if not skip or self.matchup(self.deck[k]) not in skip), None)
                if found is not None:
                    break
                self.deck = []  # every card left was skipped: a new pass
            p, pair = self.deck.pop(found)
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
    """Two of the live models, drawn at random (and their sides), answer the voter's prompt at the same time. `rng`
    is the live battles' own generator (battle_rngs), `rng_lock` its lock: the page runs handlers on many threads."""
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
