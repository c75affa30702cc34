"""LLM judges: a 0-100 score per response (chapter 7, pointwise.py) and verdicts between two responses
(pairwise.py), over one set of clients (Ollama, OpenAI-compatible servers, a local transformers model).

    prompts.py   chapter 7's judge prompt          clients.py  the backends, HTTP, structured output
    scoring.py   reading a 0-100 reply              cache.py    answers on disk, for resuming
    runner.py    asking many prompts: cache, concurrency, retries, the text fallback
    pairwise.py  MT-bench's pair prompt, both orders, verdicts (statistics: sft_hf/evaluation/win_rate.py)
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
from sft_hf.evaluation.judge.pairwise import (
    ORDERS,
    PAIRWISE_CACHE,
    PAIRWISE_PROMPT,
    PAIRWISE_PROMPT_FIELDS,
    PAIRWISE_REFERENCE_PROMPT,
    VERDICT_SCHEMA,
    Pair,
    ParsedVerdict,
    format_pairwise_summary,
    join_responses,
    judge_pairs,
    make_pair_prompt,
    pair_prompts,
    pairs_from_columns,
    parse_structured_verdict,
    parse_verdict,
    parse_verdict_reply,
    position_stats,
    run_pairwise,
    summarize_pairs,
)
from sft_hf.evaluation.judge.pointwise import compare_table, format_summary, judge_responses, run_judge, summarize
from sft_hf.evaluation.judge.prompts import (
    JUDGE_PROMPT,
    JUDGE_PROMPT_FIELDS,
    check_prompt_fields,
    format_input,
    make_judge_prompt,
)
from sft_hf.evaluation.judge.runner import JUDGE_FORMATS, ask_all, ask_with_retries
from sft_hf.evaluation.judge.scoring import SCORE_SCHEMA, ParsedScore, parse_reply, parse_score, parse_structured_score

__all__ = [
    "HFJudge",
    "JUDGE_BACKENDS",
    "JUDGE_FORMATS",
    "JUDGE_PROMPT",
    "JUDGE_PROMPT_FIELDS",
    "JudgeCache",
    "JudgeRequestError",
    "JudgeUnavailableError",
    "ORDERS",
    "OllamaJudge",
    "OpenAIJudge",
    "PAIRWISE_CACHE",
    "PAIRWISE_PROMPT",
    "PAIRWISE_PROMPT_FIELDS",
    "PAIRWISE_REFERENCE_PROMPT",
    "Pair",
    "ParsedScore",
    "ParsedVerdict",
    "SCORE_SCHEMA",
    "StructuredOutputRefused",
    "VERDICT_SCHEMA",
    "ask_all",
    "ask_with_retries",
    "check_judge_settings",
    "check_prompt_fields",
    "compare_table",
    "format_input",
    "format_pairwise_summary",
    "format_summary",
    "join_responses",
    "judge_pairs",
    "judge_responses",
    "make_judge",
    "make_judge_prompt",
    "make_pair_prompt",
    "pair_prompts",
    "pairs_from_columns",
    "parse_reply",
    "parse_score",
    "parse_structured_score",
    "parse_structured_verdict",
    "parse_verdict",
    "parse_verdict_reply",
    "position_stats",
    "run_judge",
    "run_pairwise",
    "summarize",
    "summarize_pairs",
]
