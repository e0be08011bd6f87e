"""FastChat's side-by-side and arena tabs, and its leaderboard.

Side by side: two chosen models answer the same prompt at once, both streams growing on the page.
Arena: the same with two models drawn at random, their names hidden until a vote. The vote buttons
(A is better, B is better, tie, both are bad) append the vote and both conversations to a JSON-lines
log in ``ui.log_dir`` (bentochat.yaml; off by default), one file a day as FastChat's ``--log-dir``; so
do the finished answers of both tabs. Nothing else is logged: no API key, no address. The
leaderboard tab computes Elo ratings from the arena's votes in that log, as FastChat's
``elo_analysis.compute_elo`` does.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from openai_api.streams import merge
from ui.answer import conversation, reply

VOTES = {"leftvote": "model_a", "rightvote": "model_b", "tievote": "tie", "bothbad_vote": "tie (bothbad)"}
HIDDEN = ("Model A", "Model B")
PLACEHOLDER = "Type a message for both models and press Enter"


class ConversationLog:
    """The JSON-lines log of votes and answers in ``directory``: ``conv-YYYY-MM-DD.json``, as FastChat's."""

    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory).expanduser() if directory else None

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def append(self, record: dict) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / time.strftime("conv-%Y-%m-%d.json", time.gmtime())
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"tstamp": round(time.time(), 4), **record}, ensure_ascii=False) + "\n")

    def records(self) -> list[dict]:
        if self.directory is None or not self.directory.is_dir():
            return []
        out = []
        for path in sorted(self.directory.glob("conv-*.json")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:  # a line cut short by a crash: skipped, as FastChat's reader does
                    continue
        return out


def battles(records: list[dict]) -> list[tuple[str, str, str]]:
    """(model_a, model_b, winner) of each arena vote, in order; winner as FastChat writes it."""
    return [(r["models"][0], r["models"][1], VOTES[r["type"]]) for r in records
            if r.get("type") in VOTES and r.get("anony") and len(r.get("models", [])) == 2]


def compute_elo(battles: list[tuple[str, str, str]], k: float = 4, scale: float = 400, base: float = 10,
                init: float = 1000) -> dict[str, float]:
    """Online Elo over the battles in order (FastChat's ``compute_elo``)."""
    rating: dict[str, float] = defaultdict(lambda: init)
    for a, b, winner in battles:
        ea = 1 / (1 + base ** ((rating[b] - rating[a]) / scale))
        sa = {"model_a": 1.0, "model_b": 0.0}.get(winner, 0.5)
        rating[a], rating[b] = rating[a] + k * (sa - ea), rating[b] + k * ((1 - sa) - (1 - ea))
    return dict(rating)


def leaderboard(records: list[dict]) -> list[list]:
    """Rows of (rank, model, Elo, votes, wins): from the arena's votes, best first."""
    fought = battles(records)
    rating = compute_elo(fought)
    votes, wins = defaultdict(int), defaultdict(int)
    for a, b, winner in fought:
        votes[a] += 1
        votes[b] += 1
        if winner in ("model_a", "model_b"):
            wins[a if winner == "model_a" else b] += 1
    ranked = sorted(rating, key=rating.get, reverse=True)
    return [[i, m, round(rating[m], 1), votes[m], wins[m]] for i, m in enumerate(ranked, 1)]


def build_battle(registry: Callable[[], object], available: Callable[[], list[str]], chat_models: list[str],
                 log: ConversationLog, anonymous: bool, account: Callable[[gr.Request], object | None]) -> None:
    """One tab's components (inside the caller's ``gr.Tab``): two models answer each prompt at once;
    votes below. ``anonymous``: the arena, whose models are drawn at random and named after the vote.
    ``account(request)``: a new account of the signed-in key's tenant for each answer (None: no keys)."""
    prefix = "arena" if anonymous else "sbs"
    first, second = (chat_models + chat_models)[:2] if chat_models else (None, None)
    with gr.Row(visible=not anonymous):
        model_a = gr.Dropdown(choices=chat_models, value=first, label="Model A", elem_id=f"{prefix}-model-a")
        model_b = gr.Dropdown(choices=chat_models, value=second, label="Model B", elem_id=f"{prefix}-model-b")
    names = gr.Markdown("The two models are hidden until you vote." if anonymous else "", elem_id=f"{prefix}-names")
    with gr.Row():
        bot_a = gr.Chatbot(label=HIDDEN[0] if anonymous else first, elem_id=f"{prefix}-chatbot-a", height=380,
                           buttons=["copy"])
        bot_b = gr.Chatbot(label=HIDDEN[1] if anonymous else second, elem_id=f"{prefix}-chatbot-b", height=380,
                           buttons=["copy"])
    with gr.Row():
        vote_buttons = [gr.Button(label, elem_id=f"{prefix}-{kind}", interactive=False, size="sm")
                        for kind, label in (("leftvote", "👈 A is better"), ("rightvote", "👉 B is better"),
                                            ("tievote", "🤝 Tie"), ("bothbad_vote", "👎 Both are bad"))]
    with gr.Row():
        text = gr.Textbox(placeholder=PLACEHOLDER, show_label=False, scale=8, elem_id=f"{prefix}-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id=f"{prefix}-send")
    with gr.Row():
        stop = gr.Button("Stop", interactive=False, elem_id=f"{prefix}-stop")
        new = gr.Button("New round" if anonymous else "New chat", elem_id=f"{prefix}-new")
    max_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max new tokens", elem_id=f"{prefix}-max-tokens")
    pair = gr.State([])  # the arena's two models, drawn at its first message

    def draw(models: list, a: str | None, b: str | None) -> list:
        if not anonymous:
            return [a, b]
        if models:
            return models
        up = available()
        return random.sample(up, 2) if len(up) >= 2 else (up * 2)[:2]

    def start(message: str, a: str | None, b: str | None, models: list, hist_a: list, hist_b: list):
        if not message.strip():
            return "", hist_a, hist_b, models
        turn = {"role": "user", "content": message}
        return "", hist_a + [turn], hist_b + [dict(turn)], draw(models, a, b)

    async def answer_both(models: list, hist_a: list, hist_b: list, limit: int, request: gr.Request):
        streams = [reply(registry(), m, h, max_tokens=limit, shown_as=hidden if anonymous else None,
                         account=account(request))
                   for m, h, hidden in zip(models or [None, None], (hist_a, hist_b), HIDDEN)]
        shown = [hist_a, hist_b]
        async for i, updated in merge(streams):
            shown[i] = updated
            yield shown[0], shown[1]
        for model_id, history in zip(models, shown):
            log.append({"type": "chat", "anony": anonymous, "model": model_id, "messages": conversation(history)})

    def busy():
        return (gr.Textbox(interactive=False), gr.Button(interactive=False), gr.Button(interactive=True),
                *[gr.Button(interactive=False)] * len(vote_buttons))

    def idle(hist_a: list, hist_b: list):
        answered = bool(hist_a and hist_a[-1]["role"] == "assistant" and hist_b and hist_b[-1]["role"] == "assistant")
        return (gr.Textbox(interactive=True, placeholder=PLACEHOLDER), gr.Button(interactive=True),
                gr.Button(interactive=False), *[gr.Button(interactive=answered)] * len(vote_buttons))

    def vote(kind: str, models: list, hist_a: list, hist_b: list):
        log.append({"type": kind, "anony": anonymous, "models": list(models),
                    "states": [{"model": m, "messages": conversation(h)} for m, h in zip(models, (hist_a, hist_b))]})
        gr.Info("Thanks for your vote" + ("" if log.enabled else " (votes are not logged on this server)"))
        voted = [gr.Button(interactive=False)] * len(vote_buttons)
        if not anonymous:
            return gr.Markdown(), *voted, gr.Chatbot(), gr.Chatbot(), gr.Textbox(), gr.Button()
        # The names are known now: a vote on more turns would not be blind. On to a new round.
        return (f"Model A: **{models[0]}** · Model B: **{models[1]}**", *voted, gr.Chatbot(label=models[0]),
                gr.Chatbot(label=models[1]), gr.Textbox(interactive=False, placeholder="Start a new round to vote again"),
                gr.Button(interactive=False))

    controls = [text, send, stop, *vote_buttons]
    running = []
    for event in (text.submit, send.click):
        answering = (event(start, [text, model_a, model_b, pair, bot_a, bot_b], [text, bot_a, bot_b, pair], queue=False)
                     .then(busy, None, controls, queue=False)
                     .then(answer_both, [pair, bot_a, bot_b, max_tokens], [bot_a, bot_b]))
        answering.then(idle, [bot_a, bot_b], controls, queue=False)
        running.append(answering)
    stop.click(idle, [bot_a, bot_b], controls, cancels=running, queue=False)
    for button, kind in zip(vote_buttons, VOTES):
        button.click(lambda m, a, b, kind=kind: vote(kind, m, a, b), [pair, bot_a, bot_b],
                     [names, *vote_buttons, bot_a, bot_b, text, send], queue=False)

    def new_round(a: str | None, b: str | None):
        labels = HIDDEN if anonymous else (a, b)
        hidden = "The two models are hidden until you vote." if anonymous else ""
        return gr.Chatbot(value=[], label=labels[0]), gr.Chatbot(value=[], label=labels[1]), [], hidden

    new.click(new_round, [model_a, model_b], [bot_a, bot_b, pair, names], cancels=running, queue=False).then(
        idle, [bot_a, bot_b], controls, queue=False)
    if not anonymous:
        model_a.change(lambda m: gr.Chatbot(label=m), model_a, bot_a, queue=False)
        model_b.change(lambda m: gr.Chatbot(label=m), model_b, bot_b, queue=False)


def build_leaderboard(log: ConversationLog) -> None:
    """The leaderboard tab's components: Elo from the arena's votes in the log, refreshed on demand."""
    note = ("Elo ratings from the arena's votes (FastChat's online Elo: K=4, scale 400, from 1000)."
            if log.enabled else "Votes are not logged on this server: set `ui.log_dir` in bentochat.yaml.")
    gr.Markdown(note)
    table = gr.Dataframe(headers=["Rank", "Model", "Elo", "Votes", "Wins"], value=leaderboard(log.records()),
                         interactive=False, elem_id="leaderboard")
    refresh = gr.Button("Refresh", elem_id="leaderboard-refresh", size="sm")
    refresh.click(lambda: leaderboard(log.records()), None, table, queue=False)
