"""A human preference arena (Chatbot Arena style): people vote between two anonymous responses in the browser.

    battles.py  what is compared: saved responses joined by prompt, live models, the battles drawn from them
    votes.py    the votes in SQLite (one transaction each, counted once per battle and once per voter and
                matchup), the file checked before anything is written, JSONL export
    ratings.py  Bradley-Terry ratings on Chatbot Arena's scale, bootstrap intervals, the win-rate matrix
                (style-controlled ratings: sft_hf/evaluation/style_control.py)
    guards.py   the anonymous rate limit, the login throttle, the POST routes shut
    app.py      the Gradio page          cli.py  `sft-hf arena`

votes.py, ratings.py and guards.py do not import gradio (an optional extra: pip install 'sft-hf[arena]').
"""
from sft_hf.evaluation.arena.ratings import Leaderboard, Standing, compute_leaderboard, format_leaderboard
from sft_hf.evaluation.arena.votes import WINNERS, AlreadyVoted, Vote, VoteStore, export_jsonl, read_battles

__all__ = ["AlreadyVoted", "Leaderboard", "Standing", "Vote", "VoteStore", "WINNERS", "compute_leaderboard",
           "export_jsonl", "format_leaderboard", "read_battles"]
