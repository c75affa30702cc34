"""LLM judges: a 0-100 score per response (chapter 7, pointwise.py) and verdicts between two responses
(pairwise.py), over one set of clients (Ollama, OpenAI-compatible servers, a local transformers model).

    prompts.py   chapter 7's judge prompt          clients.py  the backends, HTTP, structured output
    scoring.py   reading a 0-100 reply              cache.py    answers on disk, for resuming
    runner.py    asking many prompts: cache, concurrency, retries, the text fallback
"""
from sft_hf.evaluation.judge.cache import JudgeCache
from sft_hf.evaluation.judge.clients import (
    JUDGE_BACKENDS,
    HFJudge,
    JudgeRequestError,
    JudgeUnavailableError,
    OllamaJudge,
    OpenAIJudge,
    StructuredOutputRefused,
    check_judge_settings,
    make_judge,
)
from sft_hf.evaluation.judge.pointwise import compare_table, format_summary, judge_responses, run_judge, summarize
from sft_hf.evaluation.judge.prompts import JUDGE_PROMPT, format_input, make_judge_prompt
from sft_hf.evaluation.judge.runner import JUDGE_FORMATS, ask_all, ask_with_retries
from sft_hf.evaluation.judge.scoring import SCORE_SCHEMA, ParsedScore, parse_reply, parse_score, parse_structured_score

__all__ = [
    "HFJudge",
    "JUDGE_BACKENDS",
    "JUDGE_FORMATS",
    "JUDGE_PROMPT",
    "JudgeCache",
    "JudgeRequestError",
    "JudgeUnavailableError",
    "OllamaJudge",
    "OpenAIJudge",
    "ParsedScore",
    "SCORE_SCHEMA",
    "StructuredOutputRefused",
    "ask_all",
    "ask_with_retries",
    "check_judge_settings",
    "compare_table",
    "format_input",
    "format_summary",
    "judge_responses",
    "make_judge",
    "make_judge_prompt",
    "parse_reply",
    "parse_score",
    "parse_structured_score",
    "run_judge",
    "summarize",
]
