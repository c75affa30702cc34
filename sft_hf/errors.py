"""How a problem reaches the user: one line on stderr and an exit code, never a traceback (unless SFT_HF_DEBUG=1
asks for it); secrets from the environment redacted there and in every log line.

Exit codes: 2 bad input, 3 a non-finite loss, 4 another process of the run died (sft_hf/run/peers.py), 130 Ctrl-C,
143 stopped by SIGTERM / SIGUSR1 after saving a checkpoint (sft_hf/run/preemption.py).

Standard library only: a command that never trains (`recipes/evaluate.py --responses` asking a judge, `--help`)
starts without importing torch or transformers' Trainer (about 8 s on 2 CPU cores).
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import traceback

DEBUG = "SFT_HF_DEBUG"  # =1: the full traceback under the one-line error, for whoever debugs the library


class UserError(ValueError):
    """Bad input the user can fix (recipe, data, template, model file): one line naming what to fix, exit code 2,
    raised before any training. RecipeError, DataError, TemplateError and GGUFError are its kinds."""


class RecipeError(UserError):
    """A recipe or command-line value that cannot work."""


class DataError(UserError):
    """Bad input data; the message names the file, the record and the field."""


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf; raised before the bad update is applied or saved."""


class Interrupted(Exception):
    """Ctrl-C, with what was kept and how to go on: one line on stderr, exit code 130 (the shell's for SIGINT)."""


class Preempted(Exception):
    """SIGTERM or SIGUSR1 (a scheduler about to kill the job), with the checkpoint saved and how to go on: one line,
    exit code 143 (128 + SIGTERM: what shells report for SIGTERM and schedulers retry)."""


PREEMPTED_EXIT_CODE = 143
PEER_DIED_EXIT_CODE = 4  # another process of the run died: sft_hf/run/peers.py says which one, then exits with it


def did_you_mean(name: str, names, shown=repr) -> str:
    """The hint for a mistyped name: "did you mean 'x'?" with the closest of `names` (as `shown` writes it), or ""
    when none is close."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"did you mean {shown(close[0])}?" if close else ""


# ---------------------------------------------------------------------------------------------------------------
# Secrets

SECRET_ENV_NAME = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD)(_|$)", re.IGNORECASE)
SECRET_PATTERNS = (
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),  # Hugging Face tokens
    re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"),  # OpenAI-style API keys
    re.compile(r"(?i)(?<=bearer )[A-Za-z0-9._\-]{8,}"),
)
REDACTED = "<redacted>"


def secret_values() -> list[str]:
    """Values of environment variables named like secrets (HF_TOKEN, OPENAI_API_KEY, ...), longest first."""
    values = {v for k, v in os.environ.items() if SECRET_ENV_NAME.search(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, REDACTED)
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def install_secret_redaction() -> None:
    """Redact secrets in everything the root and the transformers/datasets log handlers write."""
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("datasets")]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


# ---------------------------------------------------------------------------------------------------------------
# Command line


def run_cli(main, argv=None) -> int:
    """Runs `main(argv)`; bad input, a non-finite loss, Ctrl-C or a SIGTERM becomes one error on stderr and a
    non-zero exit code.

    Under `accelerate launch` every process meets the same error (the same input; the non-finite and the SIGTERM flags
    are agreed), so only the first process prints it."""
    try:
        code = main(argv)
    except UserError as e:
        _print_error(e)
        return 2
    except NonFiniteLossError as e:
        _print_error(e)
        return 3
    except Interrupted as e:
        _print_error(e, prefix="\n")
        return 130
    except Preempted as e:
        _print_error(e, prefix="\n")
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt as e:
        _print_error("interrupted", prefix="\n", cause=e)
        return 130
    except BrokenPipeError:  # `sft-hf train --help | head`: the reader has gone, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor is flushing at exit
        return 0
    return code if isinstance(code, int) else 0  # a main that returns its exit code (sft-hf commands) keeps it


def _print_error(error: Exception | str, prefix: str = "", cause: BaseException | None = None) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"{prefix}error: {redact(str(error))}", file=sys.stderr)
    cause = cause or (error if isinstance(error, BaseException) else None)
    if cause is not None and os.environ.get(DEBUG, "") not in ("", "0"):
        trace = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
        print(redact(trace), file=sys.stderr, end="")
