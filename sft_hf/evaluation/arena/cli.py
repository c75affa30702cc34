"""`sft-hf arena`: people vote between two anonymous responses in the browser; the votes give Bradley-Terry ratings.

    sft-hf arena --responses base=outputs/base/test_responses.json tuned=outputs/default/test_responses.json
    sft-hf arena --responses "m1=eval-example-data.json:model 1 response" "m2=eval-example-data.json:model 2 response"
    sft-hf arena --model base=builtin:tiny-llama --model tuned=outputs/default
    sft-hf arena --model tuned=outputs/default --openai big=llama3@http://localhost:8000/v1
    sft-hf arena --leaderboard arena_votes.sqlite [--plot winrates.png]
    sft-hf arena --votes arena_votes.sqlite --export votes.jsonl

The page binds 127.0.0.1 unless --host says otherwise; --share (a public Gradio link) only when asked; a login
(--auth_file, --auth_env) takes passwords from a file or an environment variable, never from the command line.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import stat
import sys
import time
from pathlib import Path

from sft_hf.errors import RecipeError

DEFAULT_VOTES = "arena_votes.sqlite"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="sft-hf arena", allow_abbrev=False, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))
    sources = parser.add_argument_group("what to compare (two or more models)")
    sources.add_argument("--responses", nargs="+", action="extend", default=[], metavar="NAME=FILE[:COLUMN]",
                         help="saved responses of one model: a JSON(L) list of records with instruction, input and "
                              "the response column (default model_response, as recipes/evaluate.py writes)")
    sources.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER",
                         help="a local model folder (or builtin:tiny-llama) that answers prompts typed on the page")
    sources.add_argument("--openai", action="append", default=[], metavar="NAME=MODEL@URL",
                         help="a model on an OpenAI-compatible server, e.g. big=llama3@http://localhost:8000/v1")
    sources.add_argument("--api_key_env", default="OPENAI_API_KEY",
                         help="environment variable holding the servers' API key (read per request, never stored)")
    sources.add_argument("--template", default=None,
                         help="prompt template for --model folders (default: the folder's sft_template.json, "
                              "else alpaca)")
    sources.add_argument("--max_new_tokens", type=int, default=256, help="answer length of live models")
    parser.add_argument("--votes", default=None, help=f"the votes database (SQLite; default {DEFAULT_VOTES})")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for the battles drawn (prompt, pair, sides); default: random")
    server = parser.add_argument_group("the web page")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    server.add_argument("--port", type=int, default=None, help="port (default: the first free from 7860)")
    server.add_argument("--share", action="store_true", help="also a public gradio.live link (anyone with it votes)")
    server.add_argument("--auth_file", default=None, help="log in required: a file of user:password lines")
    server.add_argument("--auth_env", default=None, help="log in required: an environment variable holding "
                                                         "user:password")
    results = parser.add_argument_group("results (no page)")
    results.add_argument("--leaderboard", default=None, metavar="VOTES",
                         help="print the ratings of a votes database (or a JSONL export) and exit")
    results.add_argument("--plot", default=None, help="with --leaderboard: save the win-rate matrix as this PNG")
    results.add_argument("--export", default=None, metavar="OUT.jsonl",
                         help="write the votes as JSON lines in Chatbot Arena's battle form and exit")
    results.add_argument("--bootstrap_rounds", type=int, default=1000, help="resamples for the 95%% intervals")
    results.add_argument("--bootstrap_seed", type=int, default=0)
    return parser.parse_args(argv)


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
    board = compute_leaderboard(battles, args.bootstrap_rounds, args.bootstrap_seed)
    print(format_leaderboard(board, args.leaderboard))
    if args.plot and board.standings:
        print(f"Win-rate matrix: {plot_win_rates(battles, [s.model for s in board.standings], args.plot)}")
    return 0


def build_arena(args):
    from sft_hf.evaluation.arena.battles import BattleDeck, LocalModel, ResponseColumn, ServerModel, battle_rngs, \
        load_response_columns
    from sft_hf.evaluation.arena.votes import VoteStore

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

    store = VoteStore(args.votes or DEFAULT_VOTES)
    return Arena(store, deck, live, live_rng, args.bootstrap_rounds, args.bootstrap_seed)


def check_output_folder(flag: str, path: str | None) -> None:
    """The folder an output file goes into exists: one line now, not a traceback after the votes are read."""
    if path and not Path(path).parent.is_dir():
        raise RecipeError(f"{flag} {path}: folder {Path(path).parent} does not exist")


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.bootstrap_rounds < 0:
        raise RecipeError(f"--bootstrap_rounds {args.bootstrap_rounds}: must be 0 or more")
    check_output_folder("--export", args.export)
    check_output_folder("--plot", args.plot)
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
    arena = build_arena(args)
    if not auth and (args.share or args.host not in ("127.0.0.1", "localhost", "::1")):
        where = "a public gradio.live link" if args.share else f"{args.host}"
        print(f"warning: serving on {where} without a login: anyone who reaches it can vote "
              "(--auth_file or --auth_env adds one)", file=sys.stderr)
    print(f"Votes: {arena.store.path} ({arena.store.count()} so far); model names are shown after each vote")
    from sft_hf.evaluation.arena.app import serve

    serve(arena, args.host, args.port, args.share, auth)
    print(f"Stopped. {arena.store.count()} votes in {arena.store.path}; "
          f"`sft-hf arena --leaderboard {arena.store.path}` prints the ratings")
    return 0
