"""Score responses 0-100 with an LLM judge, as chapter 7 does with Llama 3 through Ollama.

Three backends, all behind `judge.complete(prompt, structured=False) -> str`:
- `OllamaJudge`: POST /api/chat (NDJSON stream by default, like chapter 7, or one JSON reply),
- `OpenAIJudge`: POST /v1/chat/completions of any OpenAI-compatible server (llama.cpp, vLLM, TGI, OpenAI),
  one JSON reply or server-sent events; the API key is read from an environment variable at request time and
  never stored, logged or cached,
- `HFJudge`: a local transformers model, greedy.
`structured=True` asks for {"score": <integer 0-100>} (SCORE_SCHEMA): Ollama's `format`, OpenAI's
`response_format`, or, for HFJudge, the likeliest of the answers "0".."100". The chapter 7 prompt stays the same.

`judge_responses` asks the judge for every record with bounded concurrency, retries with exponential backoff and
an on-disk JSONL cache (one line per answered item), so an interrupted run resumes without asking again.
Replies that hold no usable integer are kept and counted as unparsed, never silently dropped; structured replies
are validated against the schema, and every result says which path ("json" or "text") its score came by.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from sft_hf.errors import did_you_mean
from sft_hf.templates import get_template, reference_answer

logger = logging.getLogger(__name__)

# Chapter 7, character for character; {input} is `format_input(entry)`, the alpaca prompt without its response part.
JUDGE_PROMPT = (
    "Given the input `{input}` and correct output `{output}`, score the model response `{response}` on a scale "
    "from 0 to 100, where 100 is the best score. Respond with the integer number only."
)
OLLAMA_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # chapter 7's deterministic options


def format_input(entry: dict, template="alpaca") -> str:
    """Chapter 7's `format_input`: the prompt up to, but not including, the response header. A conversation
    (`messages`) is shown as its turns before the final reply, one `role: content` line each."""
    if entry.get("messages"):
        return "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in entry["messages"][:-1])
    template = get_template(template)
    prompt = template.format_prompt(entry)
    return prompt[: len(prompt) - len(template.response)] if template.response else prompt


def make_judge_prompt(entry: dict, response_key: str = "model_response", prompt_template: str = JUDGE_PROMPT) -> str:
    if response_key not in entry:
        raise KeyError(f"record has no field {response_key!r} (fields: {sorted(entry)})")
    return prompt_template.format(input=format_input(entry), output=reference_answer(entry), response=entry[response_key])


# ---------------------------------------------------------------------------------------------------------------
# Parsing


@dataclass
class ParsedScore:
    score: int | None
    problem: str | None = None  # why `score` is None: "no number", "out of range", "not an integer", "ambiguous"


# "0 to 100", "0-100", "out of 100", "/100": the scale, not the score.
_SCALE = re.compile(r"\b0\s*(?:to|-|–)\s*100\b|(?:out of|/)\s*100\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w])")


def parse_score(reply: str, low: int = 0, high: int = 100) -> ParsedScore:
    """A bare integer, or the single integer inside prose ("Score: 85."); anything else is unparsed, with why."""
    text = _SCALE.sub(" ", reply or "")
    numbers = {m.group().lstrip("+").rstrip(".") for m in _NUMBER.finditer(text)}
    if not numbers:
        return ParsedScore(None, "no number")
    if len(numbers) > 1:
        return ParsedScore(None, "ambiguous")
    number = numbers.pop()
    value = float(number)
    if value != int(value):
        return ParsedScore(None, "not an integer")
    if not low <= value <= high:
        return ParsedScore(None, "out of range")
    return ParsedScore(int(value))


# What a structured judge must answer: exactly {"score": <integer 0-100>}. The enum says the range again because
# llama.cpp's grammar (llama-cpp-python 0.3) ignores minimum/maximum: a 135 M judge then wrote {"score": 200}.
SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100, "enum": list(range(101))}},
    "required": ["score"],
    "additionalProperties": False,
}
JUDGE_FORMATS = ("auto", "json", "text")  # auto: JSON where the server takes it, else chapter 7's text


def parse_structured_score(reply: str) -> ParsedScore:
    """Validate a structured reply against SCORE_SCHEMA (a JSON object with one key, an integer 0-100)."""
    try:
        value = json.loads(reply)
    except (json.JSONDecodeError, TypeError):
        return ParsedScore(None, "invalid JSON")
    if not isinstance(value, dict) or set(value) != {"score"}:
        return ParsedScore(None, 'not {"score": <integer>}')
    score = value["score"]
    if isinstance(score, bool) or not isinstance(score, int):
        return ParsedScore(None, "not an integer")
    if not 0 <= score <= 100:
        return ParsedScore(None, "out of range")
    return ParsedScore(score)


def parse_reply(reply: str, asked: str) -> tuple[ParsedScore, str]:
    """The score and the path it came by. A reply asked as "json" is validated against the schema, unless it is
    prose (a server that ignored the format answered chapter 7's prompt as text): that is parsed as "text"."""
    if asked == "json" and (reply or "").lstrip()[:1] in ("{", "["):
        return parse_structured_score(reply), "json"
    return parse_score(reply), "text"


# ---------------------------------------------------------------------------------------------------------------
# Backends


class JudgeRequestError(RuntimeError):
    """A request that failed; `retryable` says whether asking again may help (timeouts, 429, 5xx)."""

    def __init__(self, message: str, retryable: bool, unreachable: bool = False, status: int | None = None):
        super().__init__(message)
        self.retryable, self.unreachable = retryable, unreachable  # unreachable: no server answered at all
        self.status = status

    @property
    def refused(self) -> bool:
        """The server answered and said no to this request (a 4xx other than timeout / rate limit)."""
        return self.status is not None and 400 <= self.status < 500 and self.status not in (408, 429)


class StructuredOutputRefused(JudgeRequestError):
    """The server refused every form of structured output it was offered (a 4xx to each)."""


class JudgeUnavailableError(RuntimeError):
    """The judge server could not be reached: stop instead of failing every item one by one."""


_client_lock = threading.Lock()
_http_client = None


def http_client():
    """One shared httpx2 client (thread-safe, pooled connections). It follows no redirect and takes no proxy from
    the environment: requests, and the API key they carry, go to the given URL only. (huggingface_hub's
    InferenceClient cannot promise that: its shared session follows redirects, reads proxy variables, refuses every
    URL under HF_HUB_OFFLINE=1, and sends the stored Hub token when no key is given.)"""
    global _http_client
    with _client_lock:
        if _http_client is None:
            import httpx2

            _http_client = httpx2.Client(follow_redirects=False, trust_env=False)
            logging.getLogger("httpx2").setLevel(logging.WARNING)  # not a log line per request
        return _http_client


@contextlib.contextmanager
def post_json(url: str, payload: dict, headers: dict | None = None, timeout: float = 120.0):
    """POST JSON; yields the open response, read whole or line by line. Errors, also those while reading the body,
    come out as JudgeRequestError."""
    import httpx2

    try:
        with http_client().stream("POST", url, json=payload, headers=headers, timeout=timeout) as response:
            status = response.status_code
            if 300 <= status < 400:
                raise JudgeRequestError(f"{url}: HTTP {status} redirect to {response.headers.get('location')} "
                                        "refused (the judge talks only to the URL it is given)", retryable=False)
            if status >= 400:
                body = " ".join(response.read().decode(errors="replace").split())[:200]
                raise JudgeRequestError(f"{url}: HTTP {status}: {body}", status=status,
                                        retryable=status in (408, 429) or status >= 500)
            yield response
    except httpx2.ConnectError as e:
        raise JudgeRequestError(f"{url}: cannot connect ({e})", retryable=True, unreachable=True) from None
    except httpx2.TimeoutException as e:
        raise JudgeRequestError(f"{url}: timed out ({type(e).__name__})", retryable=True) from None
    except httpx2.TransportError as e:  # the connection broke off, e.g. midway through a stream
        raise JudgeRequestError(f"{url}: {type(e).__name__}: {e}", retryable=True) from None


class StructuredForms:
    """The forms of structured output a backend knows, best first. A form the server refuses (4xx) is skipped from
    then on, but only once a later form has been accepted: a 4xx for another reason (a prompt too long for the
    context) is refused by every form and changes nothing."""

    def __init__(self, forms: list):
        self.forms, self.first = forms, 0

    def ask(self, send):
        error = None
        for k in range(self.first, len(self.forms)):
            try:
                reply = send(self.forms[k])
            except JudgeRequestError as e:
                if not e.refused:
                    raise
                error = e
                continue
            self.first = max(self.first, k)
            return reply
        raise StructuredOutputRefused(f"structured output refused: {error}", retryable=False, status=error.status)


@dataclass
class OllamaJudge:
    model: str = "llama3"
    url: str = "http://localhost:11434"
    stream: bool = True  # Ollama's default: one JSON object per line, the last with "done": true
    options: dict = field(default_factory=lambda: dict(OLLAMA_OPTIONS))
    timeout: float = 300.0
    max_workers: int | None = None  # no limit of its own; judge_responses decides
    # Ollama's `format`: a JSON schema (Ollama >= 0.5), else "json" (JSON mode of older versions).
    structured: StructuredForms = field(default_factory=lambda: StructuredForms([SCORE_SCHEMA, "json"]), repr=False)

    @property
    def identity(self) -> str:
        return f"ollama|{self.model}|{json.dumps(self.options, sort_keys=True)}"

    def complete(self, prompt: str, structured: bool = False) -> str:
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "options": self.options,
                   "stream": self.stream}
        if structured:
            return self.structured.ask(lambda form: self._chat({**payload, "format": form}))
        return self._chat(payload)

    def _chat(self, payload: dict) -> str:
        endpoint = self.url.rstrip("/") + "/api/chat"
        with post_json(endpoint, payload, timeout=self.timeout) as response:
            try:
                if not self.stream:
                    return json.loads(response.read())["message"]["content"]
                parts, done = [], False
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    chunk = json.loads(line)
                    if "error" in chunk:
                        raise JudgeRequestError(f"{endpoint}: {chunk['error']}", retryable=True)
                    parts.append(chunk.get("message", {}).get("content", ""))
                    done = chunk.get("done", False)
                    if done:
                        break
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise JudgeRequestError(f"{endpoint}: unexpected reply ({type(e).__name__}: {e})", True) from None
        if not done:
            raise JudgeRequestError(f"{endpoint}: the stream ended before a 'done' message", retryable=True)
        return "".join(parts)


# OpenAI-compatible `response_format`s, best first: llama.cpp's server (llama-cpp-python 0.3) constrains decoding
# only with {"type": "json_object", "schema": ...}; OpenAI itself, vLLM and others take the "json_schema" form.
OPENAI_RESPONSE_FORMATS = [
    {"type": "json_object", "schema": SCORE_SCHEMA},
    {"type": "json_schema", "json_schema": {"name": "judge_score", "schema": SCORE_SCHEMA, "strict": True}},
]


@dataclass
class OpenAIJudge:
    model: str
    url: str = "http://localhost:8000/v1"  # the base URL, up to and including /v1
    api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable; the key itself is never kept on this object
    temperature: float = 0.0
    seed: int | None = 123
    max_tokens: int | None = None
    stream: bool = False  # server-sent events, read until "data: [DONE]"
    timeout: float = 300.0
    max_workers: int | None = None
    structured: StructuredForms = field(default_factory=lambda: StructuredForms(OPENAI_RESPONSE_FORMATS), repr=False)

    @property
    def identity(self) -> str:
        return f"openai|{self.url.rstrip('/')}|{self.model}|{self.temperature}|{self.seed}|{self.max_tokens}"

    def complete(self, prompt: str, structured: bool = False) -> str:
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "temperature": self.temperature, "stream": self.stream}
        if self.seed is not None:
            payload["seed"] = self.seed
        if self.max_tokens:
            payload["max_tokens"] = self.max_tokens
        if structured:
            return self.structured.ask(lambda form: self._chat({**payload, "response_format": form}))
        return self._chat(payload)

    def _chat(self, payload: dict) -> str:
        key = os.environ.get(self.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        endpoint = self.url.rstrip("/") + "/chat/completions"
        with post_json(endpoint, payload, headers, timeout=self.timeout) as response:
            try:
                if not self.stream:
                    return json.loads(response.read())["choices"][0]["message"]["content"]
                parts, done = [], False
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, ": ping" comments, "event:" lines
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise JudgeRequestError(f"{endpoint}: {chunk['error']}", retryable=True)
                    for choice in chunk.get("choices") or []:
                        parts.append((choice.get("delta") or {}).get("content") or "")
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                raise JudgeRequestError(f"{endpoint}: unexpected reply ({type(e).__name__}: {e})", True) from None
        if not done:
            raise JudgeRequestError(f"{endpoint}: the stream ended before 'data: [DONE]'", retryable=True)
        return "".join(parts)


class HFJudge:
    """A local transformers causal LM as judge: chat template when the tokenizer has one, greedy, a few tokens.
    Structured, it scores every answer "0".."100" (followed by end of sequence) and takes the likeliest."""

    max_workers = 1  # one model, one forward pass at a time

    def __init__(self, model_name_or_path: str, max_new_tokens: int = 8, device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name_or_path = model_name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_name_or_path, device_map=device).eval()
        self.max_new_tokens = max_new_tokens

    @property
    def identity(self) -> str:
        path = Path(self.model_name_or_path)
        return f"hf|{path.resolve() if path.exists() else self.model_name_or_path}"

    def encode(self, prompt: str):
        if getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
        return self.tokenizer(prompt, return_tensors="pt").to(self.model.device)

    def complete(self, prompt: str, structured: bool = False) -> str:
        import torch

        encoded = self.encode(prompt)
        if structured:
            return json.dumps({"score": int(self.score_candidates(encoded["input_ids"]).argmax())})
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**encoded, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=pad_id)
        return self.tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)

    def score_candidates(self, prompt_ids):
        """log p(str(n) + eos | prompt) for n = 0..100: the prompt once, then all 101 answers in one batch."""
        import torch

        with torch.no_grad():
            return self._score_candidates(prompt_ids)

    def _score_candidates(self, prompt_ids):
        import torch

        answers = [self.tokenizer(str(n), add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                   for n in range(101)]
        width = max(map(len, answers))
        ids = torch.tensor([a + [0] * (width - len(a)) for a in answers], device=prompt_ids.device)
        real = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers], device=prompt_ids.device)
        out = self.model(prompt_ids, use_cache=True)
        cache = out.cache
        cache.batch_repeat_interleave(len(answers))
        mask = torch.cat([torch.ones(len(answers), prompt_ids.shape[1], dtype=real.dtype, device=real.device), real], 1)
        logits = self.model(ids, cache=cache, attention_mask=mask).logits  # (101, width, vocab)
        # token j of an answer is predicted by position j-1, its first token by the prompt's last position
        logits = torch.cat([out.logits[:, -1:].expand(len(answers), -1, -1), logits[:, :-1]], 1).float()
        token_logprobs = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return (token_logprobs * real).sum(-1)


JUDGE_BACKENDS = ("ollama", "openai", "hf")
NEEDS_MODEL = {"openai": "the model name the server serves", "hf": "a local model folder or Hub id"}


def check_judge_settings(backend: str, model: str | None) -> None:
    """The backend exists and has the model it needs: checked before anything is generated to judge."""
    if backend not in JUDGE_BACKENDS:
        hint = did_you_mean(backend, JUDGE_BACKENDS)
        raise ValueError(f"unknown --judge_backend {backend!r}: use {', '.join(JUDGE_BACKENDS)}"
                         + (f" ({hint})" if hint else ""))
    if backend in NEEDS_MODEL and not model:
        raise ValueError(f"the {backend} judge backend needs --judge_model ({NEEDS_MODEL[backend]})")


def make_judge(backend: str, model: str | None = None, url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
               stream: bool | None = None, max_tokens: int | None = None):
    """`stream` None: the backend's default (Ollama streams, OpenAI-compatible does not)."""
    check_judge_settings(backend, model)
    if backend == "ollama":
        return OllamaJudge(model=model or "llama3", url=url or "http://localhost:11434",
                           stream=True if stream is None else stream)
    if backend == "openai":
        return OpenAIJudge(model=model, url=url or "http://localhost:8000/v1", api_key_env=api_key_env,
                           max_tokens=max_tokens, stream=bool(stream))
    return HFJudge(model)


# ---------------------------------------------------------------------------------------------------------------
# Cache, retries, the run


class JudgeCache:
    """Append-only JSONL, one line per answered prompt: its key (judge identity + prompt + whether a structured
    answer was asked for; never any secret), index, reply, and the path the reply came by ("json" or "text")."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.replies: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        if self.path and self.path.is_file():
            good = []
            for line in self.path.read_text().splitlines():
                try:  # a run killed mid-write leaves a truncated last line: drop it, that item is asked again
                    item = json.loads(line)
                    self.replies[item["key"]] = (item["reply"], item.get("path", "text"))
                    good.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            self.path.write_text("".join(good))  # so the next append starts on a line of its own

    @staticmethod
    def key(identity: str, prompt: str, structured: bool = False) -> str:
        return hashlib.sha256(f"{identity}{'|structured' if structured else ''}\n{prompt}".encode()).hexdigest()

    def get(self, key: str) -> tuple[str, str] | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str, index: int, path: str = "text") -> None:
        with self._lock:
            self.replies[key] = (reply, path)
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps({"key": key, "index": index, "reply": reply, "path": path}) + "\n")


def ask_with_retries(judge, prompt: str, retries: int = 4, backoff: float = 1.0, structured: bool = False) -> str:
    """`retries` more attempts after the first, waiting backoff, 2*backoff, 4*backoff, ... in between."""
    for attempt in range(retries + 1):
        try:
            return judge.complete(prompt, structured=structured)
        except JudgeRequestError as e:
            if not e.retryable or attempt == retries:
                raise
            delay = backoff * 2**attempt
            logger.warning("judge request failed (%s); retry %d/%d in %.1fs", e, attempt + 1, retries, delay)
            time.sleep(delay)


@dataclass
class JudgeAsker:
    """Asks one prompt in the run's format; returns (reply, path). In "auto", a server that refuses structured
    output for a prompt it then answers as text is asked with text only from then on."""

    judge: object
    judge_format: str = "auto"
    retries: int = 4
    backoff: float = 1.0
    structured_refused: bool = False

    def __call__(self, prompt: str) -> tuple[str, str]:
        if self.judge_format == "text" or self.structured_refused:
            return ask_with_retries(self.judge, prompt, self.retries, self.backoff), "text"
        try:
            return ask_with_retries(self.judge, prompt, self.retries, self.backoff, structured=True), "json"
        except StructuredOutputRefused as e:
            if self.judge_format == "json":
                raise
            reply = ask_with_retries(self.judge, prompt, self.retries, self.backoff)  # a 4xx here: not the format
            if not self.structured_refused:
                logger.warning("the judge server refused structured output (%s): chapter 7's text prompt and "
                               "parsing from now on", e)
            self.structured_refused = True
            return reply, "text"


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
    if judge_format not in JUDGE_FORMATS:
        raise ValueError(f"judge_format {judge_format!r}: use one of {', '.join(JUDGE_FORMATS)}")
    cache = JudgeCache(cache_path)
    prompts = [make_judge_prompt(r, response_key, prompt_template) for r in records]
    keys = [JudgeCache.key(judge.identity, p, structured=judge_format != "text") for p in prompts]
    answered: dict[int, tuple[str, str]] = {}
    for i, key in enumerate(keys):
        hit = cache.get(key)
        if hit is not None and not (judge_format == "json" and hit[1] != "json"):
            answered[i] = hit
    failures: dict[int, str] = {}
    todo = [i for i in range(len(records)) if i not in answered]
    if answered:
        logger.info("judge cache %s: %d of %d items already answered", cache_path, len(answered), len(records))
    asker = JudgeAsker(judge, judge_format, retries, backoff)

    def ask(i: int) -> tuple[str, str]:
        reply, path = asker(prompts[i])
        cache.put(keys[i], reply, i, path)  # written as soon as it is answered: an interrupted run loses nothing
        return reply, path

    def unavailable(e: JudgeRequestError) -> JudgeUnavailableError:
        if not answered:
            return JudgeUnavailableError(f"the judge is not reachable: {e} (is the server running at that URL? "
                                         "For Ollama: `ollama serve` and `ollama pull <model>`)")
        where = f"kept in {cache.path}: run again to resume" if cache.path else "not cached (no cache file)"
        return JudgeUnavailableError(f"the judge stopped answering after {len(answered)} of {len(records)} items "
                                     f"({e}); the answers so far are {where}")

    if todo:  # the first item alone: a judge that is not running fails once, not once per item
        try:
            answered[todo[0]] = ask(todo[0])
        except JudgeRequestError as e:
            if e.unreachable:
                raise unavailable(e) from None
            failures[todo[0]] = f"request failed: {e}"
        todo = todo[1:]
    workers = max(1, min(max_workers, judge.max_workers or max_workers))
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=f"Judging {response_key}",
               disable=not show_progress)
    pool = ThreadPoolExecutor(workers)
    try:
        futures = {pool.submit(ask, i): i for i in todo}
        for future in as_completed(futures):
            i = futures[future]
            try:
                answered[i] = future.result()
            except JudgeRequestError as e:  # not cached, so a rerun asks again
                if e.unreachable:  # the server went away: stop, nothing more will be answered
                    raise unavailable(e) from None
                failures[i] = f"request failed: {e}"
            bar.update()
    finally:  # on Ctrl-C (or any error) ask nothing more; what was answered is already in the cache
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()

    results = []
    for i in range(len(records)):
        if i in failures:
            results.append({"index": i, "score": None, "reply": None, "problem": failures[i], "path": None})
            continue
        reply, asked = answered[i]
        parsed, path = parse_reply(reply, asked)
        results.append({"index": i, "score": parsed.score, "reply": reply, "problem": parsed.problem, "path": path})
    return results


# ---------------------------------------------------------------------------------------------------------------
# Reporting


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
