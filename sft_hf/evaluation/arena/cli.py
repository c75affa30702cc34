"""`sft-hf arena`: people vote between two anonymous responses in the browser; the votes give Bradley-Terry ratings.

    sft-hf arena --responses base=outputs/base/test_responses.json tuned=outputs/default/test_responses.json
    sft-hf arena --responses "m1=eval-example-data.json:model 1 response" "m2=eval-example-data.json:model 2 response"
    sft-hf arena --model base=builtin:tiny-llama --model tuned=outputs/default
    sft-hf arena --model tuned=outputs/default --openai big=llama3@http://localhost:8000/v1
    sft-hf arena --leaderboard arena_votes.sqlite [--plot winrates.png] [--style_control]
    sft-hf arena --votes arena_votes.sqlite --export votes.jsonl
    sft-hf arena --agreement outputs/pairwise/pairwise_verdicts.json --votes arena_votes.sqlite

The page binds 127.0.0.1 unless --host says otherwise; --share (a public Gradio link) only when asked; a login
(--auth_file, --auth_env) takes passwords from a file or an environment variable, never from the command line.
Without a login people vote anonymously, which the page allows only on loopback unless --allow_anonymous.
"""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sft_hf.errors import RecipeError
from sft_hf.evaluation.arena.guards import LOOPBACK
from sft_hf.run.parser import Command, parse_command

DEFAULT_VOTES = "arena_votes.sqlite"


@dataclass
class ArenaArguments:
    _argument_group_name = "arena"
    # what to compare (two or more models)
    responses: list[str] = field(default_factory=list, metadata={
        "action": "extend", "metavar": "NAME=FILE[:COLUMN]",
        "help": "Saved responses of one model: a JSON(L) list of records with instruction, input and the response "
                "column (default model_response, as recipes/evaluate.py writes)."})
    model: list[str] = field(default_factory=list, metadata={
        "action": "extend", "metavar": "NAME=FOLDER",
        "help": "A local model folder (or builtin:tiny-llama) that answers prompts typed on the page."})
    openai: list[str] = field(default_factory=list, metadata={
        "action": "extend", "metavar": "NAME=MODEL@URL",
        "help": "A model on an OpenAI-compatible server, e.g. big=llama3@http://localhost:8000/v1."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "Environment variable holding the servers' API key (read per request, never stored)."})
    template: str | None = field(default=None, metadata={
        "help": "Prompt template for --model folders (default: the folder's sft_template.json, else alpaca)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Answer length of live models."})
    max_prompt_chars: int = field(default=4000, metadata={
        "help": "Longest instruction a voter may type for live models, in characters."})
    votes: str | None = field(default=None, metadata={
        "help": f"The votes database (SQLite; default {DEFAULT_VOTES}); with --agreement also a JSONL export."})
    seed: int | None = field(default=None, metadata={
        "help": "Seed for the battles drawn (prompt, pair, sides); default: the system's randomness."})
    # the web page
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (default loopback only)."})
    port: int | None = field(default=None, metadata={"help": "Port (default: the first free from 7860)."})
    share: bool = field(default=False, metadata={"help": "Also a public gradio.live link (anyone with it votes)."})
    auth_file: str | None = field(default=None, metadata={"help": "Log in required: a file of user:password lines."})
    auth_env: str | None = field(default=None, metadata={
        "help": "Log in required: an environment variable holding user:password."})
    allow_anonymous: bool = field(default=False, metadata={
        "help": "Accept votes without a login on a non-loopback --host or with --share."})
    anonymous_votes_per_minute: int = field(default=10, metadata={
        "help": "Rate limit for voters without a login, per browser session and per remote address."})
    # results (no page)
    leaderboard: str | None = field(default=None, metadata={
        "metavar": "VOTES", "help": "Print the ratings of a votes database (or a JSONL export) and exit."})
    style_control: bool = field(default=False, metadata={
        "help": "Also style-controlled ratings (Chatbot Arena's: length and markdown as their own terms), with "
                "--leaderboard and on the page's leaderboard."})
    plot: str | None = field(default=None, metadata={
        "help": "With --leaderboard: save the win-rate matrix as this PNG; with --agreement: the confusion matrix "
                "(default agreement.png next to the verdicts)."})
    export: str | None = field(default=None, metadata={
        "metavar": "OUT.jsonl", "help": "Write the votes as JSON lines in Chatbot Arena's battle form and exit."})
    agreement: str | None = field(default=None, metadata={
        "metavar": "VERDICTS.json",
        "help": "How often the pairwise judge (recipes/evaluate.py's pairwise_verdicts.json) agrees with the votes "
                "(--votes) on the same prompts and models; writes agreement.json."})
    judge_names: list[str] | None = field(default=None, metadata={
        "metavar": "NAME", "help": "With --agreement: the arena's names of the judge's two sides, MODEL BASELINE "
                                   "(default: the names in the verdicts file)."})
    bootstrap_rounds: int = field(default=1000, metadata={"help": "Resamples for the 95-percent intervals."})
    bootstrap_seed: int = 0


ARENA = Command(
    prog="sft-hf arena", dataclass_types=(ArenaArguments,), usage="{prog} [--<key> <value> ...]",
    summary=__doc__.split("\n")[0] + "\n" + "\n".join(__doc__.split("\n")[1:]).rstrip())


def parse_args(argv) -> ArenaArguments:
    args, _ = parse_command(ARENA, argv)
    if args.judge_names is not None and len(args.judge_names) != 2:
        raise RecipeError(f"--judge_names takes two names (the judge's model, then its baseline), got "
                          f"{len(args.judge_names)}: {args.judge_names}")
    return args


def read_auth(args) -> list[tuple[str, str]] | None:
    """Logins from --auth_file (user:password per line, # comments) or --auth_env; None without either."""
    if args.auth_file and args.auth_env:
        raise RecipeError("--auth_file and --auth_env: give one of them")
    if args.auth_env:
        value = os.environ.get(args.auth_env)
        if not value:
            raise RecipeError(f"--auth_env {args.auth_env}: the variable is not set (export {args.auth_env}="
                              "user:password)")
        lines, where = [value], f"${args.auth_env}"
    elif args.auth_file:
        path = Path(args.auth_file)
        if not path.is_file():
            raise RecipeError(f"--auth_file {path}: no such file")
        if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            print(f"warning: {path} is readable by other users (chmod 600 {path})", file=sys.stderr)
        lines, where = path.read_text().splitlines(), str(path)
    else:
        return None
    logins = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.strip().partition(":")
        if not sep or not user or not password:
            raise RecipeError(f"{where}: line {n}: expected user:password")
        logins.append((user, password))
    if not logins:
        raise RecipeError(f"{where}: no user:password line")
    return logins


def show_leaderboard(args) -> int:
    from sft_hf.evaluation.arena.ratings import compute_leaderboard, format_leaderboard, plot_win_rates
    from sft_hf.evaluation.arena.votes import read_battles

    battles = read_battles(args.leaderboard)
    board = compute_leaderboard(battles, args.bootstrap_rounds, args.bootstrap_seed, args.style_control)
    print(format_leaderboard(board, args.leaderboard))
    if args.plot and board.standings:
        print(f"Win-rate matrix: {plot_win_rates(battles, [s.model for s in board.standings], args.plot)}")
    return 0


def build_arena(args):
    from sft_hf.evaluation.arena.battles import BattleDeck, LocalModel, ResponseColumn, ServerModel, battle_rngs, \
        load_response_columns
    from sft_hf.evaluation.arena.votes import VoteStore

    store = VoteStore(args.votes or DEFAULT_VOTES)  # checked first: a file that would lose votes stops the start
    deck_rng, live_rng = battle_rngs(args.seed)
    deck = live = None
    if args.responses:
        columns = [ResponseColumn.parse(spec) for spec in args.responses]
        if len(columns) < 2:
            raise RecipeError("--responses: give two or more models' responses (name=file.json name2=file2.json)")
        prompts = load_response_columns(columns)
        deck = BattleDeck(prompts, [c.name for c in columns], deck_rng)
        print(f"Saved responses: {len(prompts)} prompts answered by {', '.join(c.label for c in columns)}")
    live = [ServerModel.parse(spec, args.api_key_env, args.max_new_tokens) for spec in args.openai]
    for spec in args.model:
        name, sep, folder = spec.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise RecipeError(f"--model {spec}: use name=folder")
        started = time.time()
        live.append(LocalModel(name.strip(), folder.strip(), args.template, args.max_new_tokens).load())
        print(f"Loaded {name.strip()} from {folder.strip()} in {time.time() - started:.1f} s")
    names = [m.name for m in live]
    if len(set(names)) < len(names):
        raise RecipeError(f"--model/--openai: a model name is given twice ({', '.join(names)})")
    if live and len(live) < 2:
        raise RecipeError("--model/--openai: give two or more live models (a battle needs two)")
    if deck is None and not live:
        raise RecipeError("nothing to compare: give --responses name=file.json ... (two or more), or live models "
                          "with --model name=folder / --openai name=model@url (two or more)")
    from sft_hf.evaluation.arena.app import Arena

    return Arena(store, deck, live, live_rng, args.bootstrap_rounds, args.bootstrap_seed,
                 max_prompt_chars=args.max_prompt_chars, anonymous_votes_per_minute=args.anonymous_votes_per_minute,
                 style_control=args.style_control)


def show_agreement(args) -> int:
    from sft_hf.evaluation.agreement import compute_agreement, format_agreement, plot_agreement, read_verdicts
    from sft_hf.evaluation.arena.votes import read_battles

    verdicts = read_verdicts(args.agreement)
    if args.judge_names:
        verdicts["model"], verdicts["baseline"] = args.judge_names
    report = compute_agreement(verdicts, read_battles(args.votes or DEFAULT_VOTES), args.bootstrap_rounds,
                               args.bootstrap_seed)
    print(format_agreement(report))
    folder = Path(args.agreement).parent
    (folder / "agreement.json").write_text(json.dumps(report, indent=2) + "\n")
    plot = plot_agreement(report, args.plot or folder / "agreement.png")
    print(f"Wrote {folder / 'agreement.json'} and {plot}")
    return 0


def check_output(flag: str, path: str | None, inputs: list[str]) -> None:
    """An output file goes into a folder that exists, and over nothing it would destroy: not one of the files this
    command reads (the votes file, above all), not any existing SQLite database. One line, before anything is
    read."""
    if not path:
        return
    from sft_hf.evaluation.arena.votes import is_sqlite_file

    out = Path(path)
    if not out.parent.is_dir():
        raise RecipeError(f"{flag} {path}: folder {out.parent} does not exist")
    for given in inputs:
        if given and (out.resolve() == Path(given).resolve()
                      or out.exists() and Path(given).exists() and os.path.samefile(out, given)):
            raise RecipeError(f"{flag} {path}: that is the file this command reads ({given}); writing there would "
                              "destroy it. Give another file name")
    if out.exists() and is_sqlite_file(out):
        raise RecipeError(f"{flag} {path}: an existing SQLite database (a votes file?); refusing to overwrite it. "
                          "Give another file name")


def response_file(spec: str) -> str:
    """The file of a --responses spec (name=file.json or name=file.json:column)."""
    from sft_hf.evaluation.arena.battles import ResponseColumn

    return str(ResponseColumn.split(spec)[1])


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.bootstrap_rounds < 0:
        raise RecipeError(f"--bootstrap_rounds {args.bootstrap_rounds}: must be 0 or more")
    for flag in ("max_prompt_chars", "anonymous_votes_per_minute"):
        if getattr(args, flag) < 1:
            raise RecipeError(f"--{flag} {getattr(args, flag)}: must be 1 or more")
    if args.plot and not (args.leaderboard or args.agreement):
        raise RecipeError("--plot goes with --leaderboard (the win-rate matrix) or --agreement (the confusion "
                          "matrix)")
    if args.judge_names and not args.agreement:
        raise RecipeError("--judge_names goes with --agreement")
    inputs = [args.votes or DEFAULT_VOTES, args.leaderboard, args.agreement,
              *(response_file(spec) for spec in args.responses)]
    if args.agreement:
        inputs.append(str(Path(args.agreement).parent / "agreement.json"))  # never the votes file, either
        check_output("--plot", args.plot or str(Path(args.agreement).parent / "agreement.png"), inputs[:-1])
        check_output("--agreement (its agreement.json)", inputs[-1], inputs[:-1])
    check_output("--export", args.export, inputs)
    check_output("--plot", args.plot, inputs)
    if args.agreement:
        return show_agreement(args)
    if args.export:
        from sft_hf.evaluation.arena.votes import export_jsonl, open_votes

        source = args.votes or args.leaderboard or DEFAULT_VOTES
        print(f"Exported {export_jsonl(open_votes(source), args.export)} votes from {source} to {args.export}")
        return show_leaderboard(args) if args.leaderboard else 0
    if args.leaderboard:
        return show_leaderboard(args)
    auth = read_auth(args)
    if importlib.util.find_spec("gradio") is None:
        raise RecipeError("the arena page needs gradio: pip install 'sft-hf[arena]'")
    if not auth and not args.allow_anonymous and (args.share or args.host not in LOOPBACK):
        where = "a public gradio.live link" if args.share else f"--host {args.host}"
        raise RecipeError(f"serving on {where} without a login: anyone who reaches it could vote. Add a login "
                          "(--auth_file or --auth_env), or --allow_anonymous to take anonymous votes (rate-limited "
                          f"to --anonymous_votes_per_minute {args.anonymous_votes_per_minute} per session and per "
                          "address)")
    from sft_hf.evaluation.arena.guards import sigterm_as_ctrl_c

    with sigterm_as_ctrl_c():  # from here SIGTERM is Ctrl-C: while models load, the server starts or serves
        arena = build_arena(args)
        if not auth and (args.share or args.host not in LOOPBACK):
            print(f"warning: anonymous votes from anyone who reaches {args.host if not args.share else 'the link'} "
                  f"(--allow_anonymous), at most {args.anonymous_votes_per_minute} a minute per session and per "
                  "address", file=sys.stderr)
        print(f"Votes: {arena.store.path} ({arena.store.count()} so far); model names are shown after each vote")
        from sft_hf.evaluation.arena.app import serve

        serve(arena, args.host, args.port, args.share, auth)
    print(f"Stopped. {arena.store.count()} votes in {arena.store.path}; "
          f"`sft-hf arena --leaderboard {arena.store.path}` prints the ratings")
    return 0
