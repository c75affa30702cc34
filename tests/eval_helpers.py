"""Test helpers for the evaluation tests: a fake LLM judge server on loopback, and a tiny chatty model."""
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class FakeJudgeServer:
    """An HTTP server in a thread. `reply(prompt)` gives the judge's answer; `fail(prompt, attempt)` may return an
    HTTP status to send instead (attempt counts the requests seen for that prompt, from 1). `refuse(payload)` may
    return a status for a request by what it asks (e.g. a response_format this server does not take)."""

    def __init__(self, reply, fail=None, delay=0.0, chunk_size=3, break_stream=None, refuse=None):
        self.reply, self.fail, self.delay = reply, fail or (lambda prompt, attempt: None), delay
        self.refuse = refuse or (lambda payload: None)
        self.chunk_size, self.break_stream = chunk_size, break_stream or (lambda prompt, attempt: False)
        self.requests, self.attempts = [], {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = payload["messages"][0]["content"]
                with server.lock:
                    server.requests.append({"path": self.path, "payload": payload, "headers": dict(self.headers)})
                    attempt = server.attempts[prompt] = server.attempts.get(prompt, 0) + 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    status = server.fail(prompt, attempt) or server.refuse(payload)
                    if status:
                        self.send_error(status, "scripted failure")
                    elif self.path == "/api/chat":
                        self.ollama(payload, server.reply(prompt), server.break_stream(prompt, attempt))
                    elif self.path == "/v1/chat/completions":
                        message = {"role": "assistant", "content": server.reply(prompt)}
                        self.send_json({"id": "x", "object": "chat.completion", "model": payload["model"],
                                        "choices": [{"index": 0, "finish_reason": "stop", "message": message}]})
                    else:
                        self.send_error(404)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def send_json(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def ollama(self, payload, text, broken):
                if payload.get("stream", True) is False:
                    return self.send_json({"model": payload["model"], "message": {"role": "assistant", "content": text},
                                           "done": True})
                self.send_response(200)  # NDJSON, connection closed at the end (HTTP/1.0)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                chunks = [text[i : i + server.chunk_size] for i in range(0, len(text), server.chunk_size)]
                for chunk in chunks:
                    message = {"role": "assistant", "content": chunk}
                    line = {"model": payload["model"], "message": message, "done": False}
                    self.wfile.write((json.dumps(line) + "\n").encode())
                    self.wfile.flush()
                if not broken:
                    last = {"model": payload["model"], "message": {"role": "assistant", "content": ""}, "done": True,
                            "eval_count": len(chunks)}
                    self.wfile.write((json.dumps(last) + "\n").encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def ctrl_c_on_request(judge_class, n: int):
    """A subclass of `judge_class` whose n-th request (counted over all its instances) raises KeyboardInterrupt, as
    Ctrl-C in the middle of a run would; the others are asked as usual."""
    class CtrlCOnRequest(judge_class):
        calls = 0

        def complete(self, prompt, schema=None):
            CtrlCOnRequest.calls += 1
            if CtrlCOnRequest.calls == n:
                raise KeyboardInterrupt
            return super().complete(prompt, schema)

    CtrlCOnRequest.__name__ = f"CtrlCOnRequest{n}"
    return CtrlCOnRequest


_PAIR_ANSWER = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)


def pair_answers(prompt: str) -> tuple[str, str]:
    """The answers shown as assistant A and assistant B in a pairwise judge prompt: what a fake judge compares."""
    answers = dict(_PAIR_ANSWER.findall(prompt))
    return answers["A"], answers["B"]


@pytest.fixture(scope="session", name="chatty_model_dir")
def _chatty_model_dir(tmp_path_factory, bpe_tokenizer):
    """A tiny random Llama with large initial weights: at the default 0.02 a 32-wide model writes the same token
    for every prompt, and generation tests would compare nothing but newlines."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("chatty-llama")
    config = LlamaConfig(
        vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=bpe_tokenizer.eos_token_id, pad_token_id=bpe_tokenizer.pad_token_id, bos_token_id=None,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    return str(path)
