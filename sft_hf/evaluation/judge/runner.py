"""Asking a judge many prompts: the cache first, then the server with bounded concurrency, retries with exponential
backoff, structured output where the server takes it (text where it refuses), and a stop, not a failure per item,
when the server is gone. Shared by the 0-100 judge (pointwise.py) and the pairwise judge (pairwise.py)."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm.auto import tqdm

from sft_hf.evaluation.judge.cache import JudgeCache
from sft_hf.evaluation.judge.clients import JudgeRequestError, JudgeUnavailableError, StructuredOutputRefused

logger = logging.getLogger(__name__)

JUDGE_FORMATS = ("auto", "json", "text")  # auto: JSON where the server takes it, else the text prompt's answer


def ask_with_retries(judge, prompt: str, retries: int = 4, backoff: float = 1.0, schema: dict | None = None) -> str:
    """`retries` more attempts after the first, waiting backoff, 2*backoff, 4*backoff, ... in between."""
    for attempt in range(retries + 1):
        try:
            return judge.complete(prompt, schema)
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
    schema: dict
    judge_format: str = "auto"
    retries: int = 4
    backoff: float = 1.0
    structured_refused: bool = False

    def __call__(self, prompt: str) -> tuple[str, str]:
        if self.judge_format == "text" or self.structured_refused:
            return ask_with_retries(self.judge, prompt, self.retries, self.backoff), "text"
        try:
            return ask_with_retries(self.judge, prompt, self.retries, self.backoff, self.schema), "json"
        except StructuredOutputRefused as e:
            if self.judge_format == "json":
                raise
            reply = ask_with_retries(self.judge, prompt, self.retries, self.backoff)  # a 4xx here: not the format
            if not self.structured_refused:
                logger.warning("the judge server refused structured output (%s): the text prompt and its parsing "
                               "from now on", e)
            self.structured_refused = True
            return reply, "text"


def ask_all(prompts: list[str], judge, schema: dict, cache_path=None, judge_format: str = "auto",
            max_workers: int = 4, retries: int = 4, backoff: float = 1.0, show_progress: bool = True,
            desc: str = "Judging") -> tuple[dict[int, tuple[str, str]], dict[int, str]]:
    """Every prompt answered: ({index: (reply, path)}, {index: why its request failed}). Each answer is cached as
    soon as it arrives, so an interrupted run (Ctrl-C, a dead server) loses nothing and a rerun asks only the rest;
    failed requests are not cached, so a rerun asks them again."""
    if judge_format not in JUDGE_FORMATS:
        raise ValueError(f"judge_format {judge_format!r}: use one of {', '.join(JUDGE_FORMATS)}")
    cache = JudgeCache(cache_path)
    keys = [JudgeCache.key(judge.identity, p, structured=judge_format != "text") for p in prompts]
    answered: dict[int, tuple[str, str]] = {}
    for i, key in enumerate(keys):
        hit = cache.get(key)
        if hit is not None and not (judge_format == "json" and hit[1] != "json"):
            answered[i] = hit
    failures: dict[int, str] = {}
    todo = [i for i in range(len(prompts)) if i not in answered]
    if answered:
        logger.info("judge cache %s: %d of %d items already answered", cache_path, len(answered), len(prompts))
    asker = JudgeAsker(judge, schema, judge_format, retries, backoff)

    def ask(i: int) -> tuple[str, str]:
        reply, path = asker(prompts[i])
        cache.put(keys[i], reply, i, path)  # written as soon as it is answered: an interrupted run loses nothing
        return reply, path

    def unavailable(e: JudgeRequestError) -> JudgeUnavailableError:
        if not answered:
            return JudgeUnavailableError(f"the judge is not reachable: {e} (is the server running at that URL? "
                                         "For Ollama: `ollama serve` and `ollama pull <model>`)")
        where = f"kept in {cache.path}: run again to resume" if cache.path else "not cached (no cache file)"
        return JudgeUnavailableError(f"the judge stopped answering after {len(answered)} of {len(prompts)} items "
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
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=desc, disable=not show_progress)
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
    return answered, failures
