"""The LLM judge against real HTTP servers on loopback speaking the Ollama and OpenAI protocols."""
import collections
import json
import threading

import pytest
from torch import no_grad as torch_no_grad

from sft_hf.evaluation.judge import (
    JUDGE_PROMPT,
    JudgeUnavailableError,
    OllamaJudge,
    SCORE_SCHEMA,
    OpenAIJudge,
    format_summary,
    judge_responses,
    make_judge_prompt,
    parse_reply,
    parse_score,
    parse_structured_score,
    run_judge,
    summarize,
)

from conftest import SHARED_DATA
from eval_helpers import FakeJudgeServer, _chatty_model_dir, ctrl_c_on_request  # noqa: F401  (fixture)

EVAL_EXAMPLES = SHARED_DATA / "eval-example-data.json"
SCORES = SHARED_DATA / "scores"


def records_with_replies(replies):
    records = [{"instruction": f"Add {i} and 1.", "input": "" if i % 2 else f"{i}", "output": str(i + 1),
                "model_response": str(i + 1 if i % 3 else i)} for i in range(len(replies))]
    by_prompt = {make_judge_prompt(r): reply for r, reply in zip(records, replies)}
    return records, by_prompt


def test_judge_prompt_is_chapter_7_character_for_character():
    entry = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
             "output": "The car is as fast as lightning.", "model_response": "The car is as fast as a bullet."}
    assert make_judge_prompt(entry) == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\n"
        "The car is very fast.` and correct output `The car is as fast as lightning.`, score the model response "
        "`The car is as fast as a bullet.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )
    no_input = {**entry, "input": ""}
    assert "simile.` and correct output" in make_judge_prompt(no_input)
    custom = make_judge_prompt(entry, prompt_template="Rate {response!r} for {output}")
    assert custom == "Rate 'The car is as fast as a bullet.' for The car is as fast as lightning."


@pytest.mark.parametrize("reply, score, problem", [
    ("85", 85, None), (" 100\n", 100, None), ("0", 0, None), ("Score: 72.", 72, None),
    ("I would rate this response 90 out of 100.", 90, None), ("85/100", 85, None),
    ("On a scale from 0 to 100, I give it 40", 40, None), ("+7", 7, None), ("85.0", 85, None),
    ("150", None, "out of range"), ("-5", None, "out of range"), ("The response is good.", None, "no number"),
    ("", None, "no number"), ("Somewhere between 60 and 70", None, "ambiguous"), ("72.5", None, "not an integer"),
])
def test_parse_score(reply, score, problem):
    assert parse_score(reply) == type(parse_score("1"))(score, problem)


@pytest.mark.parametrize("stream", [True, False])
def test_ollama_protocol_streaming_and_not(stream):
    replies = ["85", "Score: 40", "no idea", "100", "7"]
    records, by_prompt = records_with_replies(replies)
    with FakeJudgeServer(by_prompt.get, chunk_size=1) as server:
        results = judge_responses(records, OllamaJudge(url=server.url, stream=stream), max_workers=2,
                                  show_progress=False)
    assert [r["score"] for r in results] == [85, 40, None, 100, 7]
    # the fake server ignores `format` (like an Ollama older than 0.5): prose replies are parsed as text
    assert results[2] == {"index": 2, "score": None, "reply": "no idea", "problem": "no number", "path": "text"}
    assert len(server.requests) == 5
    sent = server.requests[0]["payload"]
    assert sent["format"] == SCORE_SCHEMA
    assert server.requests[0]["path"] == "/api/chat"
    assert sent["model"] == "llama3" and sent["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    assert sent["stream"] is stream
    summary = summarize(results)
    assert (summary["num_scores"], summary["num_items"], summary["average"], summary["median"]) == (4, 5, 58.0, 62.5)
    text = format_summary(summary)
    assert "Number of scores: 4 of 5" in text and "Average score: 58.00" in text


def test_openai_protocol_sends_key_from_env_and_never_writes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    records, by_prompt = records_with_replies(["60", "70", "80"])
    judge = OpenAIJudge(model="my-judge", url="", api_key_env="MY_JUDGE_KEY")
    with FakeJudgeServer(by_prompt.get) as server:
        judge.url = server.url + "/v1"
        summaries = run_judge(records, judge, ["model_response"], tmp_path, max_workers=2, show_progress=False)
    assert summaries["model_response"]["average"] == 70.0
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert all(r["headers"]["Authorization"] == "Bearer sk-secret-123" for r in server.requests)
    assert server.requests[0]["payload"]["model"] == "my-judge" and server.requests[0]["payload"]["temperature"] == 0
    assert "sk-secret" not in repr(judge)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["judge_cache_model_response.jsonl", "judge_histogram.png", "judge_scores_model_response.json",
                       "judge_summary.json"]
    for path in tmp_path.iterdir():
        assert b"sk-secret" not in path.read_bytes(), path
    per_item = json.loads((tmp_path / "judge_scores_model_response.json").read_text())
    assert [p["judge_score"] for p in per_item] == [60, 70, 80] and per_item[0]["output"] == "1"


def record_waits(monkeypatch) -> list:
    """The backoff waits the runner asks for, recorded instead of slept."""
    import types

    from sft_hf.evaluation.judge import runner

    waits = []
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(sleep=waits.append))
    return waits


def test_retries_with_backoff_then_success_and_bounded_concurrency(monkeypatch):
    records, by_prompt = records_with_replies(["10", "20", "30", "40", "50", "60"])
    # Every prompt first gets a 503, then a 429, then a stream cut off before "done"; the fourth attempt works.
    fail = lambda prompt, attempt: {1: 503, 2: 429}.get(attempt)  # noqa: E731
    broken = lambda prompt, attempt: attempt == 3  # noqa: E731
    lock, running, most = threading.Lock(), [0], [0]

    class Counting(OllamaJudge):  # concurrency counted here: the server may see a handler end after the next begins
        def complete(self, prompt, structured=False):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                return super().complete(prompt, structured)
            finally:
                with lock:
                    running[0] -= 1

    waits = record_waits(monkeypatch)
    with FakeJudgeServer(by_prompt.get, fail=fail, break_stream=broken, delay=0.05) as server:
        results = judge_responses(records, Counting(url=server.url), max_workers=2, retries=3, backoff=0.02,
                                  show_progress=False)
    assert [r["score"] for r in results] == [10, 20, 30, 40, 50, 60]
    assert server.attempts == {p: 4 for p in by_prompt}
    assert most[0] == 2
    assert sorted(waits) == sorted([0.02, 0.04, 0.08] * 6)  # backoff doubling after each failed attempt, per item


def test_failures_are_kept_counted_and_not_cached_so_a_rerun_asks_again(tmp_path):
    records, by_prompt = records_with_replies(["11", "22", "33", "44", "55"])
    cache = tmp_path / "cache.jsonl"
    broken_prompts = {make_judge_prompt(records[1]), make_judge_prompt(records[3])}
    # First run: the server refuses two prompts (400: not retryable), and one answer is 503 forever (retried).
    status = {make_judge_prompt(records[1]): 400, make_judge_prompt(records[3]): 503}
    fail = lambda prompt, attempt: status.get(prompt)  # noqa: E731
    with FakeJudgeServer(by_prompt.get, fail=fail) as server:
        first = judge_responses(records, OllamaJudge(url=server.url), cache_path=cache, retries=2, backoff=0.01,
                                show_progress=False, judge_format="text")
    assert [r["score"] for r in first] == [11, None, 33, None, 55]
    assert "HTTP 400" in first[1]["problem"] and "HTTP 503" in first[3]["problem"]
    assert server.attempts[make_judge_prompt(records[1])] == 1 and server.attempts[make_judge_prompt(records[3])] == 3
    summary = summarize(first)
    assert summary["num_scores"] == 3 and summary["average"] == 33.0
    assert [u["index"] for u in summary["unscored"]] == [1, 3]
    assert len(cache.read_text().splitlines()) == 3

    # The run was "killed" while writing: a truncated last line must not break the resume.
    with open(cache, "a") as f:
        f.write('{"key": "abc", "rep')
    with FakeJudgeServer(by_prompt.get) as server:
        second = judge_responses(records, OllamaJudge(url=server.url), cache_path=cache, show_progress=False,
                                 judge_format="text")
    assert [r["score"] for r in second] == [11, 22, 33, 44, 55]
    assert {r["payload"]["messages"][0]["content"] for r in server.requests} == broken_prompts  # only those asked

    # A third run asks nothing at all; a different judge model does not reuse the cache.
    with FakeJudgeServer(by_prompt.get) as server:
        third = judge_responses(records, OllamaJudge(url=server.url), cache_path=cache, show_progress=False,
                                judge_format="text")
        assert [r["score"] for r in third] == [11, 22, 33, 44, 55] and server.requests == []
        judge_responses(records, OllamaJudge(model="other", url=server.url), cache_path=cache, show_progress=False,
                        judge_format="text")
        assert len(server.requests) == 5


def test_a_judge_that_is_not_running_stops_the_run_once(tmp_path, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    records, _ = records_with_replies(["1", "2", "3"])
    asked = []

    class Counting(OllamaJudge):
        def complete(self, prompt, structured=False):
            asked.append(prompt)
            return super().complete(prompt, structured)

    waits = record_waits(monkeypatch)
    with pytest.raises(JudgeUnavailableError, match=f"127.0.0.1:{port}.*ollama serve"):
        judge_responses(records, Counting(url=f"http://127.0.0.1:{port}"), retries=2, backoff=0.01,
                        show_progress=False)
    assert len(set(asked)) == 1 and len(asked) <= 3  # the first item only (with its retries): not once per item
    assert sum(waits) <= 0.03


def test_an_interrupted_run_resumes_without_asking_again(tmp_path):
    records, by_prompt = records_with_replies(["10", "20", "30", "40", "50", "60"])
    cache = tmp_path / "cache.jsonl"

    with FakeJudgeServer(by_prompt.get) as server:
        with pytest.raises(KeyboardInterrupt):
            judge_responses(records, ctrl_c_on_request(OllamaJudge, 4)(url=server.url), cache_path=cache,
                            max_workers=1, show_progress=False)
        # The interrupt stops the run; a request the worker thread had already started may still finish (and be
        # cached), but nothing queued is asked.
        asked_before = len(server.requests)
        assert 3 <= asked_before <= 4
        resumed = judge_responses(records, OllamaJudge(url=server.url), cache_path=cache, max_workers=1,
                                  show_progress=False)
    assert [r["score"] for r in resumed] == [10, 20, 30, 40, 50, 60]
    assert sorted(server.attempts.values()) == [1] * 6  # the resumed run asked only those left, each prompt once


@pytest.mark.parametrize("judge_name, averages", [("llama3-8b", (77.05, 67.37)), ("gpt4", (74.09, 56.57))])
def test_chapter_7_reference_averages_side_by_side(tmp_path, judge_name, averages, capsys):
    """A judge replying with chapter 7's stored per-item scores reproduces their averages on eval-example-data.

    The stored Llama 3 list for model 2 has 99 scores (the notebook dropped a reply it could not parse), so the
    fake judge answers the 100th item in prose without a number: it must be kept and counted as unscored.
    """
    records = json.loads(EVAL_EXAMPLES.read_text())
    keys = ["model 1 response", "model 2 response"]
    # Where both models wrote the same response the prompt is the same, but the stored scores (sampled) differ:
    # the columns are judged one after the other, so each prompt's replies are served in column order.
    replies = collections.defaultdict(list)
    for n, key in enumerate(keys, start=1):
        scores = json.loads((SCORES / f"{judge_name}-model-{n}-response.json").read_text())
        for i, record in enumerate(records):
            reply = str(scores[i]) if i < len(scores) else "I cannot judge this response."
            reply = f"Score: {reply}" if i % 10 == 0 and i < len(scores) else reply
            replies[make_judge_prompt(record, key)].append(reply)
    with FakeJudgeServer(lambda prompt: replies[prompt].pop(0)) as server:
        summaries = run_judge(records, OllamaJudge(url=server.url), keys, tmp_path, max_workers=4, show_progress=False)
    assert round(summaries[keys[0]]["average"], 2) == averages[0]
    assert round(summaries[keys[1]]["average"], 2) == averages[1]
    expected_scored = (100, 99) if judge_name == "llama3-8b" else (100, 100)
    assert (summaries[keys[0]]["num_scores"], summaries[keys[1]]["num_scores"]) == expected_scored
    out = capsys.readouterr().out
    assert f"Number of scores: {expected_scored[1]} of 100" in out
    assert f"Average score: {averages[0]:.2f}" in out
    assert f"{averages[0]:.2f}" in out.splitlines()[-2] and f"{averages[1]:.2f}" in out.splitlines()[-1]
    assert (tmp_path / "judge_histogram.png").stat().st_size > 1000
    assert JUDGE_PROMPT.startswith("Given the input `")


def test_local_transformers_judge(chatty_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_hf.evaluation.judge import HFJudge

    records, _ = records_with_replies(["", "", ""])
    judge = HFJudge(chatty_model_dir, max_new_tokens=5)
    results = judge_responses(records, judge, max_workers=4, show_progress=False, judge_format="text")
    model = AutoModelForCausalLM.from_pretrained(chatty_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(chatty_model_dir)
    for record, result in zip(records, results):
        ids = tokenizer(make_judge_prompt(record), return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert result["reply"] == reply
        assert (result["score"], result["problem"]) == (parse_score(reply).score, parse_score(reply).problem)
    assert summarize(results)["num_items"] == 3


@torch_no_grad()
def test_local_transformers_judge_structured_takes_the_likeliest_integer(chatty_model_dir):
    """Structured, the hf judge answers {"score": n} for the n whose text + eos is likeliest after the prompt:
    checked against one full forward pass per candidate (no cache, no batching)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_hf.evaluation.judge import HFJudge

    records, _ = records_with_replies(["", "", "", ""])
    judge = HFJudge(chatty_model_dir)
    results = judge_responses(records, judge, show_progress=False, judge_format="json")
    model = AutoModelForCausalLM.from_pretrained(chatty_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(chatty_model_dir)
    answers = [tokenizer(str(n), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for n in range(101)]
    expected = []
    for record in records:  # each prompt + answer whole, right-padded, one forward pass for the 101 of them
        prompt = tokenizer(make_judge_prompt(record))["input_ids"]
        width = len(prompt) + max(map(len, answers))
        rows = torch.tensor([prompt + a + [0] * (width - len(prompt) - len(a)) for a in answers])
        logits = model(rows).logits.log_softmax(-1)
        logprobs = [sum(logits[n, len(prompt) - 1 + j, t].item() for j, t in enumerate(a)) for n, a in enumerate(answers)]
        expected.append(max(range(101), key=logprobs.__getitem__))
    assert [r["score"] for r in results] == expected
    assert [r["path"] for r in results] == ["json"] * 4
    assert results[0]["reply"] == json.dumps({"score": expected[0]})
    assert len(set(expected)) > 1  # the prompts lead to different scores: the test compares something


def test_the_judge_talks_only_to_the_url_it_is_given(tmp_path, monkeypatch):
    """No redirect is followed (the API key would travel with it) and no proxy from the environment is used."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy that would refuse: must not be used
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    records, by_prompt = records_with_replies(["42"])
    with FakeJudgeServer(by_prompt.get) as elsewhere:
        class Redirect(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.send_response(307)
                self.send_header("Location", elsewhere.url + "/v1/chat/completions")
                self.send_header("Content-Length", "0")
                self.end_headers()

        redirector = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
        threading.Thread(target=redirector.serve_forever, daemon=True).start()
        try:
            judge = OpenAIJudge(model="m", url=f"http://127.0.0.1:{redirector.server_port}/v1",
                                api_key_env="MY_JUDGE_KEY")
            summary = run_judge(records, judge, ["model_response"], tmp_path / "r", max_workers=1,
                                show_progress=False)["model_response"]
        finally:
            redirector.shutdown()
        assert elsewhere.requests == []  # the redirect target never heard from us
        assert summary["num_items"] == 1 and summary["num_scores"] == 0  # kept and counted as unscored

        direct = OpenAIJudge(model="m", url=elsewhere.url + "/v1", api_key_env="MY_JUDGE_KEY")
        summary = run_judge(records, direct, ["model_response"], tmp_path / "d", max_workers=1,
                            show_progress=False)["model_response"]
        assert summary["average"] == 42.0  # straight to the given loopback URL, the proxy variables ignored


@pytest.mark.parametrize("reply, score, problem", [
    ('{"score": 85}', 85, None), ('{ "score": 0 }', 0, None), ("{\n  \"score\": 100\n}", 100, None),
    ('{"score": 101}', None, "out of range"), ('{"score": -1}', None, "out of range"),
    ('{"score": 85.5}', None, "not an integer"), ('{"score": "85"}', None, "not an integer"),
    ('{"score": true}', None, "not an integer"), ('{"score": 85, "why": "good"}', None, 'not {"score": <integer>}'),
    ('{"rating": 85}', None, 'not {"score": <integer>}'), ("[85]", None, 'not {"score": <integer>}'),
    ('{"score": 8', None, "invalid JSON"),  # cut off by max_tokens: never read as the text "8"
])
def test_structured_replies_are_validated_against_the_schema(reply, score, problem):
    assert parse_structured_score(reply) == type(parse_structured_score("1"))(score, problem)
    assert parse_reply(reply, "json") == (parse_structured_score(reply), "json")
    # prose where JSON was asked (a server that ignored the format): chapter 7's parsing, counted as text
    assert parse_reply("I give it 85.", "json") == (parse_score("85"), "text")


def structured(payload):
    return "response_format" in payload or "format" in payload


def test_auto_falls_back_to_text_where_the_server_refuses_structured_output():
    """A server that answers 400 to any response_format: auto asks each form once for the first item, then the
    text prompt; once text has worked it asks text only. json mode keeps the items unscored, with why."""
    records, by_prompt = records_with_replies(["85", "Score: 40", "no idea", "100"])
    refuse = lambda payload: 400 if structured(payload) else None  # noqa: E731
    with FakeJudgeServer(by_prompt.get, refuse=refuse) as server:
        results = judge_responses(records, OpenAIJudge(model="m", url=server.url + "/v1"), max_workers=2,
                                  show_progress=False)
        forms = [r["payload"].get("response_format") for r in server.requests]
    assert [r["score"] for r in results] == [85, 40, None, 100]
    assert [r["path"] for r in results] == ["text"] * 4
    # item 0: both response_format forms refused, then text; items 1-3: text only
    assert [f and f["type"] for f in forms] == ["json_object", "json_schema", None, None, None, None]
    assert forms[0]["schema"] == SCORE_SCHEMA and forms[1]["json_schema"]["schema"] == SCORE_SCHEMA
    assert summarize(results)["score_paths"] == {"text": 3}

    with FakeJudgeServer(by_prompt.get, refuse=refuse) as server:
        strict = judge_responses(records, OpenAIJudge(model="m", url=server.url + "/v1"), show_progress=False,
                                 judge_format="json", retries=0)
    assert [r["score"] for r in strict] == [None] * 4
    assert all(r["problem"].startswith("request failed: structured output refused") for r in strict)
    assert "HTTP 400" in strict[0]["problem"]


def test_a_4xx_about_something_else_keeps_structured_output_on():
    """A prompt the server refuses whatever the format (too long, say) fails alone; the others stay structured."""
    records, _ = records_with_replies(["", "", "", ""])
    too_long = make_judge_prompt(records[1])
    scores = {make_judge_prompt(r): 10 * (i + 1) for i, r in enumerate(records)}
    reply = lambda prompt: json.dumps({"score": scores[prompt]})  # noqa: E731
    fail = lambda prompt, attempt: 400 if prompt == too_long else None  # noqa: E731
    with FakeJudgeServer(reply, fail=fail) as server:
        results = judge_responses(records, OpenAIJudge(model="m", url=server.url + "/v1"), max_workers=1,
                                  show_progress=False)
    assert [r["score"] for r in results] == [10, None, 30, 40]
    assert [r["path"] for r in results] == ["json", None, "json", "json"]
    assert "HTTP 400" in results[1]["problem"]
    assert [bool(structured(r["payload"])) for r in server.requests[-2:]] == [True, True]


def test_the_response_format_the_server_takes_is_remembered():
    """OpenAI itself refuses json_object without the word JSON in the prompt but takes json_schema: after the
    first item, only json_schema is sent."""
    records, _ = records_with_replies(["", "", ""])
    reply = lambda prompt: '{"score": 70}'  # noqa: E731
    refuse = lambda payload: 400 if (payload.get("response_format") or {}).get("type") == "json_object" else None  # noqa: E731
    with FakeJudgeServer(reply, refuse=refuse) as server:
        results = judge_responses(records, OpenAIJudge(model="m", url=server.url + "/v1"), max_workers=1,
                                  show_progress=False, judge_format="json")
    assert [r["score"] for r in results] == [70, 70, 70] and {r["path"] for r in results} == {"json"}
    assert [r["payload"]["response_format"]["type"] for r in server.requests] == [
        "json_object", "json_schema", "json_schema", "json_schema"]
    summary = summarize(results)
    assert summary["score_paths"] == {"json": 3}
    assert "Scores by path: json 3" in format_summary(summary)


def test_ollama_format_is_the_schema_then_json_mode():
    records, _ = records_with_replies(["", ""])
    refuse = lambda payload: 400 if isinstance(payload.get("format"), dict) else None  # noqa: E731
    with FakeJudgeServer(lambda prompt: '{"score": 55}', refuse=refuse) as server:
        results = judge_responses(records, OllamaJudge(url=server.url), max_workers=1, show_progress=False)
    assert [r["score"] for r in results] == [55, 55] and [r["path"] for r in results] == ["json", "json"]
    assert [r["payload"]["format"] for r in server.requests] == [SCORE_SCHEMA, "json", "json"]


def test_cached_replies_keep_their_path_and_json_mode_asks_again_for_text_ones(tmp_path):
    records, by_prompt = records_with_replies(["85", "40"])
    cache = tmp_path / "cache.jsonl"
    refuse = lambda payload: 400 if structured(payload) else None  # noqa: E731
    with FakeJudgeServer(by_prompt.get, refuse=refuse) as server:
        first = judge_responses(records, OllamaJudge(url=server.url), cache_path=cache, show_progress=False)
    assert [(r["score"], r["path"]) for r in first] == [(85, "text"), (40, "text")]
    assert [json.loads(line)["path"] for line in cache.read_text().splitlines()] == ["text", "text"]
    with FakeJudgeServer(lambda prompt: '{"score": 90}') as server:
        again = judge_responses(records, OllamaJudge(url=server.url), cache_path=cache, show_progress=False)
        assert server.requests == [] and [r["score"] for r in again] == [85, 40]  # auto: the cache serves
        strict = judge_responses(records, OllamaJudge(url=server.url), cache_path=cache, show_progress=False,
                                 judge_format="json")
        assert len(server.requests) == 2 and [(r["score"], r["path"]) for r in strict] == [(90, "json")] * 2
