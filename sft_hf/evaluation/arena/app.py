"""The arena page (Gradio 6): one instruction, two anonymous responses side by side, four vote buttons; the model
names appear only once the vote is stored. A leaderboard tab shows the Bradley-Terry ratings and the win-rate matrix.

What keeps the names from the browser before the vote: the battle (names included) lives in a gr.State, whose
value Gradio keeps on the server (it sends None for it); the page shows only the two responses; the leaderboard,
which lists every model, is computed only when its tab is opened; every event handler is private
(api_visibility="private": not in the API page, not callable by Gradio's clients) and, since Gradio still answers
a plain POST to /gradio_api/run/... and /call/... for private handlers, those routes are shut (guards.OnlyThePage);
the run history, which would keep outputs in the browser, is off.

What keeps the votes honest: a battle counts only for the voter it was shown to (a login, or an anonymous browser
session); a voter votes once per prompt and pair of models (in the votes file's transaction); anonymous sessions
are rate-limited, per session and per remote address; a vote that cannot be written stops the page taking votes and says
so, instead of losing votes unseen.
"""
import collections
import html
import io
import logging
import random
import signal
import sqlite3
import threading
from dataclasses import dataclass, field

import gradio as gr
from PIL import Image

from sft_hf.errors import RecipeError
from sft_hf.evaluation.arena.battles import Battle, BattleDeck, LiveModelsFailed, live_battle
from sft_hf.evaluation.arena.guards import LOOPBACK, LoginGuard, OnlyThePage, RateLimiter
from sft_hf.evaluation.arena.ratings import compute_leaderboard, plot_win_rates, style_ranks, voters_line
from sft_hf.evaluation.arena.votes import AlreadyVoted, Vote, VoteStore, battle_record, session_id

logger = logging.getLogger(__name__)

VOTE_BUTTONS = {  # winner → button label, element id
    "model_a": ("← A is better", "vote-a"),
    "model_b": ("B is better →", "vote-b"),
    "tie": ("Tie", "vote-tie"),
    "tie (bothbad)": ("Both are bad", "vote-bothbad"),
}
VERDICTS = {"model_a": "A is better", "model_b": "B is better", "tie": "a tie", "tie (bothbad)": "both are bad"}
PRIVATE = dict(api_visibility="private")  # no API endpoint a script could call to read a battle
REPEATED_VOTE = "repeated vote, counted once"  # the operator's log line when a battle is voted on again
REFUSALS = {  # what a refused vote is counted as, in the leaderboard's counts
    "matchup": "a second vote on the same prompt and pair",
    "rate": "over the anonymous rate limit",
    "other_voter": "on a battle shown to another voter",
    "unwritten": "not written (votes file)",
}


@dataclass
class Voter:
    """Who is asking: a login name, or an anonymous browser session (stored as a hash of Gradio's session hash),
    and the address the request came from."""
    login: str | None
    session: str | None
    address: str

    @property
    def identity(self) -> str:
        return f"login:{self.login}" if self.login is not None else f"session:{self.session}"


def voter_of(request) -> Voter | None:
    """Who sent a page event; None without a request (a handler called outside Gradio)."""
    if request is None:
        return None
    login = getattr(request, "username", None)
    session_hash = getattr(request, "session_hash", None)
    client = getattr(request, "client", None)
    return Voter(login, None if login is not None or session_hash is None else session_id(session_hash),
                 getattr(client, "host", None) or "unknown")


def rate_keys(voter: Voter) -> tuple[str, ...]:
    """What an anonymous voter's rate limit counts against: the browser session, and the remote address (new tabs
    from one address share its budget; loopback's tabs are the people at this machine, each limited alone). A
    login has no rate limit."""
    if voter.session is None:
        return ()
    return (f"session:{voter.session}",) + ((f"address:{voter.address}",) if voter.address not in LOOPBACK else ())


@dataclass
class Board:
    """One leaderboard computation: the table, the plot, and the vote count it was computed for."""
    version: tuple
    board: object
    plot: Image.Image | None


@dataclass
class Arena:
    store: VoteStore
    deck: BattleDeck | None = None  # battles from saved responses
    live_models: list = field(default_factory=list)  # LocalModel / ServerModel, for prompts typed by the voter
    live_rng: random.Random = field(default_factory=random.SystemRandom)  # live battles' own (the deck has its own)
    bootstrap_rounds: int = 1000
    bootstrap_seed: int = 0
    live_rng_lock: threading.Lock = field(default_factory=threading.Lock)
    max_prompt_chars: int = 4000  # a live battle's instruction, longer is refused before any model sees it
    anonymous_votes_per_minute: int = 10  # per anonymous session and per remote address (1 or more)
    style_control: bool = False  # the leaderboard also shows style-controlled ratings

    def __post_init__(self):
        self.limiter = RateLimiter(self.anonymous_votes_per_minute)  # anonymous votes
        self.ask_limiter = RateLimiter(self.anonymous_votes_per_minute)  # anonymous questions to live models
        self.refused = collections.Counter()  # REFUSALS key → votes refused since the server started
        self.stopped: str | None = None  # why votes are no longer taken (the votes file failed)
        self.board: Board | None = None  # the last leaderboard, reused until the votes change
        self.board_lock = threading.Lock()  # one computation at a time; whoever waits gets its result

    # ---- the handlers, plain functions of plain values (tests call them without a browser)

    def new_battle(self, voter: Voter | None = None) -> Battle | None:
        """The next battle from the saved responses this voter has not voted on; None when none is left."""
        battle = self.deck.draw(self.store.matchups_of(voter.login, voter.session) if voter else frozenset())
        if battle is not None and voter is not None:
            battle.served_to = voter.identity
        return battle

    def ask(self, prompt: str, voter: Voter | None = None) -> Battle:
        """A live battle on the voter's prompt; LiveModelsFailed (a message safe to show) when it cannot be had."""
        if not prompt or not prompt.strip():
            raise LiveModelsFailed("Type an instruction for the two models first.")
        if len(prompt) > self.max_prompt_chars:
            raise LiveModelsFailed(f"Your instruction has {len(prompt):,} characters; this arena takes at most "
                                   f"{self.max_prompt_chars:,}. Shorten it and ask again.")
        keys = rate_keys(voter) if voter is not None else ()
        if keys and (wait := self.ask_limiter.acquire(*keys)):  # the models' time is shared by every voter
            raise LiveModelsFailed(f"Anonymous voters can ask {self.ask_limiter.limit} questions a minute; ask "
                                   f"again in {max(1, round(wait))} s.")
        battle = live_battle(prompt.strip(), self.live_models, self.live_rng, self.live_rng_lock)
        battle.served_to = voter.identity if voter is not None else None
        return battle

    def vote(self, battle: Battle | None, winner: str, voter: Voter | None = None) -> tuple[str, bool]:
        """(what the voter reads, whether the battle can still be voted on). The reveal (the two names and the
        votes so far) once the vote is stored; otherwise why it was not counted, in words. Without a voter (a
        script calling this directly) the vote is nobody's: no per-voter limit."""
        voter = voter or Voter(None, None, "local")
        if self.stopped:
            return self.stopped_message(), False
        if battle is None:
            return "There is no battle to vote on yet: press **Next battle** or ask a question.", False
        if battle.served_to is not None and battle.served_to != voter.identity:
            self.refuse("other_voter", voter, battle)
            return ("**Not counted:** this battle was shown to another voter. Reload the page for a battle of "
                    "your own."), False
        keys = rate_keys(voter)
        if keys and (wait := self.limiter.acquire(*keys)):
            self.refuse("rate", voter, battle)
            return (f"**Not counted yet:** anonymous voters can vote {self.limiter.limit} times a minute. Read "
                    f"both answers, then vote again in {max(1, round(wait))} s."), True
        try:
            inserted, stored = self.store.add(Vote(
                battle_id=battle.battle_id, model_a=battle.model_a, model_b=battle.model_b, winner=winner,
                instruction=battle.instruction, input=battle.input, response_a=battle.response_a,
                response_b=battle.response_b, source=battle.source, voter=voter.login, session=voter.session))
        except AlreadyVoted:
            self.limiter.release(*keys)
            self.refuse("matchup", voter, battle)
            return (f"### Model A: {name_md(battle.model_a)} · Model B: {name_md(battle.model_b)}\n**Not counted:** "
                    "you already voted on this instruction and these two models; your first vote stands."), False
        except (sqlite3.Error, OSError) as e:  # the file went read-only, the disk is full, the file was damaged
            self.limiter.release(*keys)
            self.refuse("unwritten", voter, battle)
            self.stop(f"the votes file {self.store.path} cannot be written ({e})")
            return self.stopped_message(), False
        if inserted:  # the operator's log; the browser gets only the reveal below
            print(f"vote {self.store.count()}: {battle.model_a} vs {battle.model_b}: {winner}", flush=True)
            again = ""
        else:  # a double click or a replayed request
            self.limiter.release(*keys)
            print(f"{REPEATED_VOTE} on battle {battle.battle_id}", flush=True)
            again = " (this battle already had your vote: it counts once)"
        return (f"### Model A: {name_md(battle.model_a)} · Model B: {name_md(battle.model_b)}\n"
                f"Your vote: **{VERDICTS[stored]}**{again}. Votes so far: {self.store.count()}."), False

    def refuse(self, reason: str, voter: Voter, battle: Battle) -> None:
        self.refused[reason] += 1
        print(f"vote refused ({REFUSALS[reason]}): {voter.identity} from {voter.address}, battle "
              f"{battle.battle_id}", flush=True)

    def stop(self, reason: str) -> None:
        """No more votes on this page (every voter is told); the operator gets the reason on stderr."""
        if not self.stopped:
            self.stopped = reason
            logger.error("arena: %s; the page takes no more votes. Votes stored so far are kept; fix the file "
                         "(or start with a new --votes file) and restart", reason)

    def stopped_message(self) -> str:
        return ("**Your vote could not be saved, and this arena has stopped taking votes:** the votes file cannot "
                "be written. Votes already counted are kept. Please tell the person running the arena.")

    def limits_text(self) -> str:
        refused = ", ".join(f"{self.refused[k]} {text}" for k, text in REFUSALS.items() if self.refused[k])
        return (f"Limits: one vote per voter on each instruction and pair of models; anonymous voters at most "
                f"{self.limiter.limit} votes a minute (per browser session; the sessions of one remote "
                f"address share one budget). Votes refused since the server started: {refused or 'none'}.")

    def leaderboard(self) -> tuple[str, "Image.Image | None"]:
        """The ratings, computed once per new vote: a refresh while they are computed waits for that computation
        and gets its result; a refresh without a new vote gets the last one."""
        with self.board_lock:
            version = self.store.version()
            if self.board is None or self.board.version != version:
                battles = [battle_record(v) for v in self.store.votes()]
                board = compute_leaderboard(battles, self.bootstrap_rounds, self.bootstrap_seed, self.style_control)
                plot = None
                if board.standings:
                    png = io.BytesIO()
                    plot_win_rates(battles, [s.model for s in board.standings], png)
                    plot = Image.open(png)
                self.board = Board(version, board, plot)
            current = self.board
        return format_board(current.board) + "\n\n" + self.limits_text(), current.plot


def format_board(board) -> str:
    if not board.standings:
        return "No votes yet."
    style = board.style is not None
    rows = ["| rank | model | rating | 95% interval | votes | wins | losses | ties | both bad |"
            + (" style-controlled | its 95% interval |" if style else ""),
            "|---:|:---|---:|:---:|---:|---:|---:|---:|---:|" + ("---:|:---:|" if style else "")]
    for rank, s in enumerate(board.standings, 1):
        rows.append(f"| {rank} | {name_md(s.model)} | {s.rating:.0f} | {s.lower:.0f} to {s.upper:.0f} | "
                    f"{s.votes} | {s.wins} | {s.losses} | {s.ties} | {s.bothbad} |"
                    + (f" {s.style_rating:.0f} | {s.style_lower:.0f} to {s.style_upper:.0f} |" if style else ""))
    counted = f"{board.num_votes} votes" + (f" {voters}" if (voters := voters_line(board)) else "")
    text = "\n".join(rows) + (
        f"\n\n{counted}. Bradley-Terry ratings as Chatbot Arena computes them: 400 points = 10:1 odds, mean 1000, a "
        f"tie half a win for each side (both bad too); 95% intervals from {board.rounds} bootstrap resamples (seed "
        f"{board.seed}).")
    if style:
        from sft_hf.evaluation.style_control import format_coefficients

        order = ", ".join(name_md(s.model) for s in style_ranks(board))
        text += (f"\n\nStyle-controlled (Chatbot Arena's style control: answer length, markdown headers, list items "
                 f"and bold as their own terms, ratings read at equal style): {order}. Style coefficients (logit per "
                 f"standard deviation, 95% interval): {format_coefficients(board.style)}.")
    if board.warning:
        text += f"\n\n**Note:** {html.escape(board.warning)}"
    return text


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
                                              placeholder="Ask anything; two of the models answer it",
                                              max_length=arena.max_prompt_chars)
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

        def show(b: Battle | None, message: str = ""):
            prompt = "" if b is None else b.instruction + (f"\n\n{b.input}" if b.input else "")
            votable = gr.Button(interactive=b is not None and not arena.stopped)
            return [b, prompt, *(("", "") if b is None else (b.response_a, b.response_b)),
                    arena.stopped_message() if arena.stopped else message, *[votable] * len(buttons)]

        def start(request: gr.Request = None):
            if arena.deck is None or arena.stopped:
                return show(None)
            b = arena.new_battle(voter_of(request))
            return show(b, "" if b is not None else "You have voted on every instruction and pair of models here. "
                                                    "Thank you!")

        demo.load(start, outputs=shown, **PRIVATE)
        if arena.deck is not None:
            next_battle.click(start, outputs=shown, **PRIVATE)
        if arena.live_models:
            def ask_both(prompt, request: gr.Request = None):
                try:
                    return show(arena.ask(prompt, voter_of(request)))
                except LiveModelsFailed as e:  # a warning; the page stays as it was
                    gr.Warning(str(e))
                    return [gr.skip()] * len(shown)

            # one live battle at a time: the models share this machine's cores
            ask.click(ask_both, inputs=question, outputs=shown, concurrency_limit=1, **PRIVATE)
            question.submit(ask_both, inputs=question, outputs=shown, concurrency_limit=1, **PRIVATE)

        for winner, button in buttons.items():
            def vote(b: Battle | None, request: gr.Request = None, winner=winner):
                text, votable = arena.vote(b, winner, voter_of(request))
                return [text, *[gr.Button(interactive=votable)] * len(buttons)]

            # votes are cheap and SQLite serialises them: no queue limit, twenty voters at once are fine
            button.click(vote, inputs=battle, outputs=[reveal, *buttons.values()], concurrency_limit=None, **PRIVATE)

        # the leaderboard names every model: computed only when asked for, never with the page; one computation
        # at a time for the tab and the button together (Arena.leaderboard reuses it until a new vote)
        for event in (board_tab.select, refresh.click):
            event(arena.leaderboard, outputs=[board_text, board_plot], concurrency_limit=1,
                  concurrency_id="leaderboard", **PRIVATE)
    return demo


def serve(arena: Arena, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
          auth: list[tuple[str, str]] | None = None) -> None:
    """Serves until Ctrl-C or SIGTERM, then closes the server and returns (the caller prints its summary). Both
    signals only set a flag the main thread waits on, so one arriving while Gradio starts lands nowhere in the
    middle of it: the start finishes, then the server closes. A second signal interrupts at once. Each vote is
    already on disk when its voter sees the names."""
    from starlette.middleware import Middleware

    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    main_thread = threading.current_thread() is threading.main_thread()  # only the main thread sets handlers
    previous = [signal.signal(s, on_signal) for s in signals] if main_thread else []
    demo = None
    try:
        demo = build_app(arena)
        demo.queue(default_concurrency_limit=4, api_open=False)
        try:
            demo.launch(server_name=host, server_port=port, share=share, auth=LoginGuard(auth).login if auth else None,
                        auth_message="Log in to vote" if auth else None, show_error=False, quiet=False,
                        footer_links=["gradio", "settings"], run_history=False, theme=gr.themes.Soft(),
                        app_kwargs={"middleware": [Middleware(OnlyThePage)]}, prevent_thread_lock=True)
        except OSError as e:  # a port in use, an address this machine does not have
            raise RecipeError(f"cannot serve the arena on {host}:{port or '7860-7959'}: {e}") from None
        while demo.is_running and not stop.wait(0.2):
            pass
        if stop.is_set():
            print("Interrupted: closing the server.", flush=True)
    finally:
        for s, handler in zip(signals, previous):
            signal.signal(s, handler)
        if demo is not None:
            demo.close(verbose=False)
