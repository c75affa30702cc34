"""The arena page (Gradio 6): one instruction, two anonymous responses side by side, four vote buttons; the model
names appear only once the vote is stored. A leaderboard tab shows the Bradley-Terry ratings and the win-rate matrix.

What keeps the names from the browser before the vote: the battle (names included) lives in a gr.State, whose
value Gradio keeps on the server (it sends None for it); the page shows only the two responses; the leaderboard,
which lists every model, is computed only when its tab is opened; every event handler is private
(api_visibility="private": not in the API page, not callable by Gradio's clients), and the run history, which would
keep outputs in the browser, is off.
"""
import html
import io
import random
import threading
from dataclasses import dataclass, field

import gradio as gr
from PIL import Image

from sft_hf.errors import RecipeError
from sft_hf.evaluation.arena.battles import Battle, BattleDeck, LiveModelsFailed, live_battle
from sft_hf.evaluation.arena.ratings import compute_leaderboard, plot_win_rates
from sft_hf.evaluation.arena.votes import Vote, VoteStore, battle_record

VOTE_BUTTONS = {  # winner → button label, element id
    "model_a": ("← A is better", "vote-a"),
    "model_b": ("B is better →", "vote-b"),
    "tie": ("Tie", "vote-tie"),
    "tie (bothbad)": ("Both are bad", "vote-bothbad"),
}
VERDICTS = {"model_a": "A is better", "model_b": "B is better", "tie": "a tie", "tie (bothbad)": "both are bad"}
PRIVATE = dict(api_visibility="private")  # no API endpoint a script could call to read a battle
REPEATED_VOTE = "repeated vote, counted once"  # the operator's log line when a battle is voted on again


@dataclass
class Arena:
    store: VoteStore
    deck: BattleDeck | None = None  # battles from saved responses
    live_models: list = field(default_factory=list)  # LocalModel / ServerModel, for prompts typed by the voter
    live_rng: random.Random = field(default_factory=random.Random)  # live battles' own (the deck has its own)
    bootstrap_rounds: int = 1000
    bootstrap_seed: int = 0
    live_rng_lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- the handlers, plain functions of plain values (tests call them without a browser)

    def new_battle(self) -> Battle:
        return self.deck.draw()

    def ask(self, prompt: str) -> Battle:
        """A live battle on the voter's prompt; LiveModelsFailed (a message safe to show) when it cannot be had."""
        if not prompt or not prompt.strip():
            raise LiveModelsFailed("Type an instruction for the two models first.")
        return live_battle(prompt.strip(), self.live_models, self.live_rng, self.live_rng_lock)

    def vote(self, battle: Battle | None, winner: str, voter: str | None = None) -> str:
        """Stores the vote (once per battle) and returns the reveal: the two names and the vote counted."""
        if battle is None:
            raise gr.Error("There is no battle to vote on yet.")
        inserted, stored = self.store.add(Vote(
            battle_id=battle.battle_id, model_a=battle.model_a, model_b=battle.model_b, winner=winner,
            instruction=battle.instruction, input=battle.input, response_a=battle.response_a,
            response_b=battle.response_b, source=battle.source, voter=voter))
        again = "" if inserted else " (this battle already had your vote: it counts once)"
        if inserted:  # the operator's log; the browser gets only the reveal below
            print(f"vote {self.store.count()}: {battle.model_a} vs {battle.model_b}: {winner}", flush=True)
        else:  # a double click or a replayed request
            print(f"{REPEATED_VOTE} on battle {battle.battle_id}", flush=True)
        return (f"### Model A: {name_md(battle.model_a)} · Model B: {name_md(battle.model_b)}\n"
                f"Your vote: **{VERDICTS[stored]}**{again}. Votes so far: {self.store.count()}.")

    def leaderboard(self) -> tuple[str, "Image.Image | None"]:
        battles = [battle_record(v) for v in self.store.votes()]
        board = compute_leaderboard(battles, self.bootstrap_rounds, self.bootstrap_seed)
        if not board.standings:
            return "No votes yet.", None
        rows = ["| rank | model | rating | 95% interval | votes | wins | losses | ties | both bad |",
                "|---:|:---|---:|:---:|---:|---:|---:|---:|---:|"]
        for rank, s in enumerate(board.standings, 1):
            rows.append(f"| {rank} | {name_md(s.model)} | {s.rating:.0f} | {s.lower:.0f} to {s.upper:.0f} | "
                        f"{s.votes} | {s.wins} | {s.losses} | {s.ties} | {s.bothbad} |")
        text = "\n".join(rows) + (
            f"\n\n{board.num_votes} votes. Bradley-Terry ratings as Chatbot Arena computes them: 400 points = 10:1 "
            f"odds, mean 1000, a tie half a win for each side (both bad too); 95% intervals from "
            f"{board.rounds} bootstrap resamples (seed {board.seed}).")
        if board.warning:
            text += f"\n\n**Note:** {html.escape(board.warning)}"
        png = io.BytesIO()
        plot_win_rates(battles, [s.model for s in board.standings], png)
        return text, Image.open(png)


def name_md(name: str) -> str:
    return f"`{name.replace('`', '')}`"


def build_app(arena: Arena) -> gr.Blocks:
    # delete_cache: the win-rate PNGs of earlier refreshes, dropped after an hour
    with gr.Blocks(title="sft-hf arena", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        battle = gr.State(None)  # the current Battle: kept on the server, never sent to the browser
        gr.Markdown("## Which answer is better?\nTwo anonymous models answer the same instruction. Vote for the "
                    "better answer; the names of the two models are shown after your vote.")
        with gr.Tabs():
            with gr.Tab("Vote", id="vote"):
                if arena.live_models:
                    with gr.Row(equal_height=True):
                        question = gr.Textbox(label="Your instruction", lines=2, scale=4, elem_id="arena-question",
                                              placeholder="Ask anything; two of the models answer it")
                        ask = gr.Button("Ask two models", variant="primary", scale=1, elem_id="arena-ask")
                prompt_view = gr.Textbox(label="Instruction", lines=2, interactive=False, elem_id="arena-prompt")
                with gr.Row(equal_height=True):
                    response_a = gr.Textbox(label="Model A", lines=8, interactive=False, buttons=["copy"],
                                            elem_id="arena-response-a")
                    response_b = gr.Textbox(label="Model B", lines=8, interactive=False, buttons=["copy"],
                                            elem_id="arena-response-b")
                with gr.Row():
                    buttons = {w: gr.Button(label, interactive=False, elem_id=elem_id)
                               for w, (label, elem_id) in VOTE_BUTTONS.items()}
                reveal = gr.Markdown(elem_id="arena-reveal")
                next_battle = gr.Button("Next battle", variant="primary", visible=arena.deck is not None,
                                        elem_id="arena-next")
            with gr.Tab("Leaderboard", id="leaderboard") as board_tab:
                board_text = gr.Markdown("Open this tab or press Refresh to compute the ratings.",
                                         elem_id="arena-leaderboard")
                board_plot = gr.Image(label="Win rates", type="pil", format="png", interactive=False,
                                      buttons=["download", "fullscreen"], elem_id="arena-winrates")
                refresh = gr.Button("Refresh", elem_id="arena-refresh")

        shown = [battle, prompt_view, response_a, response_b, reveal, *buttons.values()]

        def show(b: Battle | None):
            prompt = "" if b is None else b.instruction + (f"\n\n{b.input}" if b.input else "")
            votable = gr.Button(interactive=b is not None)
            return [b, prompt, *(("", "") if b is None else (b.response_a, b.response_b)), "",
                    *[votable] * len(buttons)]

        def start():
            return show(arena.new_battle() if arena.deck is not None else None)

        demo.load(start, outputs=shown, **PRIVATE)
        if arena.deck is not None:
            next_battle.click(start, outputs=shown, **PRIVATE)
        if arena.live_models:
            def ask_both(prompt):
                try:
                    return show(arena.ask(prompt))
                except LiveModelsFailed as e:  # a warning; the page stays as it was
                    gr.Warning(str(e))
                    return [gr.skip()] * len(shown)

            # one live battle at a time: the models share this machine's cores
            ask.click(ask_both, inputs=question, outputs=shown, concurrency_limit=1, **PRIVATE)
            question.submit(ask_both, inputs=question, outputs=shown, concurrency_limit=1, **PRIVATE)

        for winner, button in buttons.items():
            def vote(b: Battle | None, request: gr.Request, winner=winner):
                text = arena.vote(b, winner, getattr(request, "username", None))
                return [text, *[gr.Button(interactive=False)] * len(buttons)]

            # votes are cheap and SQLite serialises them: no queue limit, twenty voters at once are fine
            button.click(vote, inputs=battle, outputs=[reveal, *buttons.values()], concurrency_limit=None, **PRIVATE)

        # the leaderboard names every model: computed only when asked for, never with the page
        board_tab.select(arena.leaderboard, outputs=[board_text, board_plot], concurrency_limit=1, **PRIVATE)
        refresh.click(arena.leaderboard, outputs=[board_text, board_plot], concurrency_limit=1, **PRIVATE)
    return demo


def serve(arena: Arena, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
          auth: list[tuple[str, str]] | None = None) -> None:
    """Blocks until Ctrl-C (or SIGTERM); each vote is already on disk when its voter sees the names."""
    demo = build_app(arena)
    demo.queue(default_concurrency_limit=4)
    try:
        demo.launch(server_name=host, server_port=port, share=share, auth=auth or None,
                    auth_message="Log in to vote" if auth else None, show_error=False, quiet=False,
                    footer_links=["gradio", "settings"], run_history=False, theme=gr.themes.Soft())
    except OSError as e:  # a port in use, an address this machine does not have
        raise RecipeError(f"cannot serve the arena on {host}:{port or '7860-7959'}: {e}") from None
