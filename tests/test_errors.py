"""How a problem reaches the user (sft_hf/errors.py): secrets redacted in every log line, card and saved file; the
full traceback under the one-line error with SFT_HF_DEBUG=1."""
import logging
import os
import subprocess
import sys

from sft_hf import train as train_recipe  # noqa: E402  (recipes/train.py runs it)
from sft_hf.errors import redact

from tiny_setup import ROOT, train_argv

SECRETS = {"HF_TOKEN": "hf_EnvSecretToken1234567890abcdef", "JUDGE_API_KEY": "sk-judge-Secret-0123456789abcdef"}


CLI_TOKEN = "hf_CliSecretToken0987654321zyxwvu"


def test_no_token_or_api_key_in_logs_cards_or_saved_files(tiny, tmp_path, monkeypatch, caplog, capsys):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        train_recipe.main(train_argv(tiny, out, "--hub_token", CLI_TOKEN))
        # anything that logs a key (a judge client, a failed request) is redacted by the handlers main() set up
        logging.getLogger("sft_hf.evaluation.judge").warning("POST with Authorization: Bearer %s", SECRETS["JUDGE_API_KEY"])
    printed = capsys.readouterr()
    logs = caplog.text + printed.out + printed.err
    assert "Bearer <redacted>" in logs
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"README.md", "training_args.bin", "config.json", "trainer_state.json"} <= {p.name for p in files}
    for secret in [*SECRETS.values(), CLI_TOKEN]:
        assert secret not in logs
        for path in files:  # pickled training args in the model and every checkpoint included
            assert secret.encode() not in path.read_bytes(), path


def test_redact():
    os.environ["SFT_HF_TEST_SECRET"] = "s3cret-value-42"
    try:
        text = redact("key=s3cret-value-42 hf_abcdefghijklmnopqrstuvwxyz sk-0123456789abcdefXYZ Bearer abc.def-123")
    finally:
        del os.environ["SFT_HF_TEST_SECRET"]
    assert text == "key=<redacted> <redacted> <redacted> Bearer <redacted>"
    assert redact("tokens/example mean 12.5") == "tokens/example mean 12.5"


def test_sft_hf_debug_prints_the_traceback_under_the_one_line_error(tmp_path):
    """Users get one line; whoever debugs the library sets SFT_HF_DEBUG=1 and gets the stack under it."""
    argv = [sys.executable, str(ROOT / "recipes" / "train.py"), "--learning_rte", "1"]
    plain = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, SFT_HF_DEBUG="0"))
    debug = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, SFT_HF_DEBUG="1"))
    line = "error: command line: unknown option --learning_rte; did you mean --learning_rate?"
    assert plain.returncode == debug.returncode == 2
    assert plain.stderr.strip().splitlines() == [line]
    assert debug.stderr.startswith(line + "\nTraceback (most recent call last):")
    assert "sft_hf/run/config.py" in debug.stderr and debug.stderr.strip().endswith(line[len("error: "):])
