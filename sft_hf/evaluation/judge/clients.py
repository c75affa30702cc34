"""The judge backends, all behind `judge.complete(prompt, schema=None) -> str`:
- `OllamaJudge`: POST /api/chat (NDJSON stream by default, like chapter 7, or one JSON reply),
- `OpenAIJudge`: POST /v1/chat/completions of any OpenAI-compatible server (llama.cpp, vLLM, TGI, OpenAI),
  one JSON reply or server-sent events; the API key is read from an environment variable at request time and
  never stored, logged or cached,
- `HFJudge`: a local transformers model, greedy.
`schema` (a JSON schema, e.g. SCORE_SCHEMA or the pairwise judge's VERDICT_SCHEMA) asks for structured output:
Ollama's `format`, OpenAI's `response_format`, or, for HFJudge, the likeliest of the schema's enumerated answers.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sft_hf.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)

OLLAMA_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # chapter 7's deterministic options


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


class JudgeUnavailableError(UserError):
    """The judge server could not be reached, or stopped answering: stop instead of failing every item one by one.
    A UserError (start the server, fix --judge_url): `run_cli` prints it as one line, exit code 2."""


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
    """The forms of structured output a backend knows, best first, each a function of the JSON schema asked for.
    A form the server refuses (4xx) is skipped from then on, but only once a later form has been accepted: a 4xx
    for another reason (a prompt too long for the context) is refused by every form and changes nothing."""

    def __init__(self, forms: list):
        self.forms, self.first = forms, 0

    def ask(self, send, schema: dict):
        error = None
        for k in range(self.first, len(self.forms)):
            try:
                reply = send(self.forms[k](schema))
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
    structured: StructuredForms = field(
        default_factory=lambda: StructuredForms([lambda schema: schema, lambda schema: "json"]), repr=False)

    @property
    def identity(self) -> str:
        return f"ollama|{self.model}|{json.dumps(self.options, sort_keys=True)}"

    def complete(self, prompt: str, schema: dict | None = None) -> str:
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "options": self.options,
                   "stream": self.stream}
        if schema:
            return self.structured.ask(lambda form: self._chat({**payload, "format": form}), schema)
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
    lambda schema: {"type": "json_object", "schema": schema},
    lambda schema: {"type": "json_schema", "json_schema": {"name": "judge_verdict", "schema": schema, "strict": True}},
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

    def complete(self, prompt: str, schema: dict | None = None) -> str:
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "temperature": self.temperature, "stream": self.stream}
        if self.seed is not None:
            payload["seed"] = self.seed
        if self.max_tokens:
            payload["max_tokens"] = self.max_tokens
        if schema:
            return self.structured.ask(lambda form: self._chat({**payload, "response_format": form}), schema)
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
    Structured, it scores every answer the schema's one property enumerates ("0".."100" for a score, "A", "B",
    "tie" for a verdict), each followed by end of sequence, and takes the likeliest."""

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

    def complete(self, prompt: str, schema: dict | None = None) -> str:
        import torch

        encoded = self.encode(prompt)
        if schema:
            (name, spec), = schema["properties"].items()  # one property with an enum: the answers to rank
            answers = spec["enum"]
            best = int(self.score_candidates(encoded["input_ids"], [str(a) for a in answers]).argmax())
            return json.dumps({name: answers[best]})
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**encoded, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=pad_id)
        return self.tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)

    def score_candidates(self, prompt_ids, candidates: list[str]):
        """log p(candidate + eos | prompt) for each candidate text: the prompt once, then all answers in one batch."""
        import torch

        with torch.no_grad():
            return self._score_candidates(prompt_ids, candidates)

    def _score_candidates(self, prompt_ids, candidates: list[str]):
        import torch

        answers = [self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                   for text in candidates]
        width = max(map(len, answers))
        ids = torch.tensor([a + [0] * (width - len(a)) for a in answers], device=prompt_ids.device)
        real = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers], device=prompt_ids.device)
        out = self.model(prompt_ids, use_cache=True)
        cache = out.cache
        cache.batch_repeat_interleave(len(answers))
        mask = torch.cat([torch.ones(len(answers), prompt_ids.shape[1], dtype=real.dtype, device=real.device), real], 1)
        logits = self.model(ids, cache=cache, attention_mask=mask).logits  # (answers, width, vocab)
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

