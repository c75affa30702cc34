"""Score responses 0-100 with an LLM judge, as chapter 7 does with Llama 3 through Ollama.

Three backends, all behind `judge.complete(prompt) -> str`:
- `OllamaJudge`: POST /api/chat (NDJSON stream by default, like chapter 7, or one JSON reply),
- `OpenAIJudge`: POST /v1/chat/completions of any OpenAI-compatible server (vLLM, llama.cpp, TGI, OpenAI);
  the API key is read from an environment variable at request time and never stored, logged or cached,
- `HFJudge`: a local transformers model, greedy.

`judge_responses` asks the judge for every record with bounded concurrency, retries with exponential backoff and
an on-disk JSONL cache (one line per answered item), so an interrupted run resumes without asking again.
Replies that hold no usable integer are kept and counted as unparsed, never silently dropped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import statistics
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from sft_hf.templates import get_template

logger = logging.getLogger(__name__)

# Chapter 7, character for character; {input} is `format_input(entry)`, the alpaca prompt without its response part.
JUDGE_PROMPT = (
    "Given the input `{input}` and correct output `{output}`, score the model response `{response}` on a scale "
    "from 0 to 100, where 100 is the best score. Respond with the integer number only."
)
OLLAMA_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # chapter 7's deterministic options


def format_input(entry: dict, template="alpaca") -> str:
    """Chapter 7's `format_input`: the prompt up to, but not including, the response header."""
    template = get_template(template)
    prompt = template.format_prompt(entry)
    return prompt[: len(prompt) - len(template.response)] if template.response else prompt


def make_judge_prompt(entry: dict, response_key: str = "model_response", prompt_template: str = JUDGE_PROMPT) -> str:
    if response_key not in entry:
        raise KeyError(f"record has no field {response_key!r} (fields: {sorted(entry)})")
    return prompt_template.format(input=format_input(entry), output=entry["output"], response=entry[response_key])


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


# ---------------------------------------------------------------------------------------------------------------
# Backends


class JudgeRequestError(RuntimeError):
    """A request that failed; `retryable` says whether asking again may help (timeouts, 429, 5xx)."""

    def __init__(self, message: str, retryable: bool, unreachable: bool = False):
        super().__init__(message)
        self.retryable, self.unreachable = retryable, unreachable  # unreachable: no server answered at all


class JudgeUnavailableError(RuntimeError):
    """The judge server could not be reached at all: stop instead of failing every item one by one."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise JudgeRequestError(f"{req.full_url}: HTTP {code} redirect to {newurl} refused (the judge talks only to "
                                "the URL it is given)", retryable=False)


# No proxies from the environment and no redirects: requests (and the API key they carry) go to the given URL only.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _RefuseRedirects())


def post_json(url: str, payload: dict, headers: dict | None = None, timeout: float = 120.0):
    """POST JSON; returns the open response (the caller reads it as one JSON document or as NDJSON lines)."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        return _OPENER.open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        body = " ".join(e.read().decode(errors="replace").split())[:200]
        raise JudgeRequestError(f"{url}: HTTP {e.code}: {body}", retryable=e.code == 429 or e.code >= 500) from None
    except (urllib.error.URLError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        refused = isinstance(reason, (ConnectionRefusedError, OSError)) and not isinstance(reason, TimeoutError)
        raise JudgeRequestError(f"{url}: {reason}", retryable=True, unreachable=refused) from None
    except TimeoutError as e:
        raise JudgeRequestError(f"{url}: timed out ({e})", retryable=True) from None


@dataclass
class OllamaJudge:
    model: str = "llama3"
    url: str = "http://localhost:11434"
    stream: bool = True  # Ollama's default: one JSON object per line, the last with "done": true
    options: dict = field(default_factory=lambda: dict(OLLAMA_OPTIONS))
    timeout: float = 300.0
    max_workers: int | None = None  # no limit of its own; judge_responses decides

    @property
    def identity(self) -> str:
        return f"ollama|{self.model}|{json.dumps(self.options, sort_keys=True)}"

    def complete(self, prompt: str) -> str:
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "options": self.options,
                   "stream": self.stream}
        endpoint = self.url.rstrip("/") + "/api/chat"
        with post_json(endpoint, payload, timeout=self.timeout) as response:
            try:
                if not self.stream:
                    return json.loads(response.read())["message"]["content"]
                parts, done = [], False
                for line in response:
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
            except (TimeoutError, ConnectionError, OSError) as e:  # the stream broke off midway
                raise JudgeRequestError(f"{endpoint}: {e}", retryable=True) from None
        if not done:
            raise JudgeRequestError(f"{endpoint}: the stream ended before a 'done' message", retryable=True)
        return "".join(parts)


@dataclass
class OpenAIJudge:
    model: str
    url: str = "http://localhost:8000/v1"  # the base URL, up to and including /v1
    api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable; the key itself is never kept on this object
    temperature: float = 0.0
    seed: int | None = 123
    max_tokens: int | None = None
    timeout: float = 300.0
    max_workers: int | None = None

    @property
    def identity(self) -> str:
        return f"openai|{self.url.rstrip('/')}|{self.model}|{self.temperature}|{self.seed}"

    def complete(self, prompt: str) -> str:
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "temperature": self.temperature}
        if self.seed is not None:
            payload["seed"] = self.seed
        if self.max_tokens:
            payload["max_tokens"] = self.max_tokens
        key = os.environ.get(self.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        endpoint = self.url.rstrip("/") + "/chat/completions"
        with post_json(endpoint, payload, headers, timeout=self.timeout) as response:
            try:
                return json.loads(response.read())["choices"][0]["message"]["content"]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                raise JudgeRequestError(f"{endpoint}: unexpected reply ({type(e).__name__}: {e})", True) from None


class HFJudge:
    """A local transformers causal LM as judge: chat template when the tokenizer has one, greedy, a few tokens."""

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

    def complete(self, prompt: str) -> str:
        import torch

        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = prompt
        encoded = self.tokenizer(text, return_tensors="pt").to(self.model.device)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**encoded, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=pad_id)
        return self.tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def make_judge(backend: str, model: str | None = None, url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
               stream: bool = True):
    if backend == "ollama":
        return OllamaJudge(model=model or "llama3", url=url or "http://localhost:11434", stream=stream)
    if backend == "openai":
        if not model:
            raise ValueError("the openai judge backend needs --judge_model (the model name the server serves)")
        return OpenAIJudge(model=model, url=url or "http://localhost:8000/v1", api_key_env=api_key_env)
    if backend == "hf":
        if not model:
            raise ValueError("the hf judge backend needs --judge_model (a local model folder or Hub id)")
        return HFJudge(model)
    raise ValueError(f"unknown judge backend {backend!r}: use ollama, openai or hf")


# ---------------------------------------------------------------------------------------------------------------
# Cache, retries, the run


class JudgeCache:
    """Append-only JSONL, one line per answered prompt, keyed by judge identity + prompt (never by any secret)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.replies: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path and self.path.is_file():
            good = []
            for line in self.path.read_text().splitlines():
                try:  # a run killed mid-write leaves a truncated last line: drop it, that item is asked again
                    item = json.loads(line)
                    self.replies[item["key"]] = item["reply"]
                    good.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            self.path.write_text("".join(good))  # so the next append starts on a line of its own

    @staticmethod
    def key(identity: str, prompt: str) -> str:
        return hashlib.sha256(f"{identity}\n{prompt}".encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str, index: int) -> None:
        with self._lock:
            self.replies[key] = reply
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps({"key": key, "index": index, "reply": reply}) + "\n")


def ask_with_retries(judge, prompt: str, retries: int = 4, backoff: float = 1.0) -> str:
    """`retries` more attempts after the first, waiting backoff, 2*backoff, 4*backoff, ... in between."""
    for attempt in range(retries + 1):
        try:
            return judge.complete(prompt)
        except JudgeRequestError as e:
            if not e.retryable or attempt == retries:
                raise
            delay = backoff * 2**attempt
            logger.warning("judge request failed (%s); retry %d/%d in %.1fs", e, attempt + 1, retries, delay)
            time.sleep(delay)


def judge_responses(
    records: list[dict], judge, response_key: str = "model_response", prompt_template: str = JUDGE_PROMPT,
    cache_path: str | Path | None = None, max_workers: int = 4, retries: int = 4, backoff: float = 1.0,
    show_progress: bool = True,
) -> list[dict]:
    """One result per record, in order: index, score (int or None), reply, problem (why unscored, else None)."""
    cache = JudgeCache(cache_path)
    prompts = [make_judge_prompt(r, response_key, prompt_template) for r in records]
    keys = [JudgeCache.key(judge.identity, p) for p in prompts]
    replies: dict[int, str] = {i: cache.get(k) for i, k in enumerate(keys) if cache.get(k) is not None}
    failures: dict[int, str] = {}
    todo = [i for i in range(len(records)) if i not in replies]
    if replies:
        logger.info("judge cache %s: %d of %d items already answered", cache_path, len(replies), len(records))

    def ask(i: int) -> str:
        reply = ask_with_retries(judge, prompts[i], retries, backoff)
        cache.put(keys[i], reply, i)  # written as soon as it is answered: an interrupted run loses nothing
        return reply

    if todo:  # the first item alone: a judge that is not running fails once, not once per item
        try:
            replies[todo[0]] = ask(todo[0])
        except JudgeRequestError as e:
            if e.unreachable:
                raise JudgeUnavailableError(f"the judge is not reachable: {e} (is the server running at that URL? "
                                            "For Ollama: `ollama serve` and `ollama pull <model>`)") from None
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
                replies[i] = future.result()
            except JudgeRequestError as e:  # not cached, so a rerun asks again
                failures[i] = f"request failed: {e}"
            bar.update()
    finally:  # on Ctrl-C (or any error) ask nothing more; what was answered is already in the cache
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()

    results = []
    for i in range(len(records)):
        if i in failures:
            results.append({"index": i, "score": None, "reply": None, "problem": failures[i]})
            continue
        parsed = parse_score(replies[i])
        results.append({"index": i, "score": parsed.score, "reply": replies[i], "problem": parsed.problem})
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
) -> dict[str, dict]:
    """Judge every response column, print chapter 7's summary, write per-item JSON, a histogram, a comparison."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_by_key, summaries = {}, {}
    for key in response_keys:
        slug = re.sub(r"\W+", "-", key).strip("-")
        results = judge_responses(records, judge, key, prompt_template, output_dir / f"judge_cache_{slug}.jsonl",
                                  max_workers, retries, backoff, show_progress)
        results_by_key[key], summaries[key] = results, summarize(results)
        print("\n" + format_summary(summaries[key], key))
        per_item = [{**records[r["index"]], **{f"judge_{k}": v for k, v in r.items() if k != "index"}}
                    for r in results]
        (output_dir / f"judge_scores_{slug}.json").write_text(json.dumps(per_item, indent=2) + "\n")
    plot_histogram(results_by_key, output_dir / "judge_histogram.png")
    if len(summaries) > 1:
        print("\n" + compare_table(summaries))
    summary_file = {k: {**s, "judge": judge.identity} for k, s in summaries.items()}
    (output_dir / "judge_summary.json").write_text(json.dumps(summary_file, indent=2) + "\n")
    return summaries
