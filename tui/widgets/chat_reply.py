"""One reply from the engine, in the reply's worker thread: the engine's events become messages
that the chat draws on the UI thread, in the order they were said.

Streamed text is batched (at most one redraw every ``FLUSH_S``); the engine dying mid-reply
keeps what arrived (``ReplyCut``) and tells the app, whose header and Tutor tab then say so.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from textual import work
from textual.message import Message

from tui.messages import TutorStatus
from tui.widgets.chat_entry import ChatEntry
from tutor.engine.client import EngineGone, EngineRefused
from tutor.text import clean

if TYPE_CHECKING:
    from tui.widgets.chat_view import ChatView
    from tutor.assistant.grounding import TutorAnswer

# Streamed text is drawn at most this often: a redraw per token would take the engine's cores.
# About seven redraws a second: every 0.08 s the Tutor tab decoded nf4 at 0.83-0.91x `ask`'s
# speed, every 0.15 s at 0.85-1.00x (README, "Precision trade-off": attention at a decode step).
FLUSH_S = 0.15


class ReplyEvent(Message):
    """What the engine said about one entry's reply, posted by the reply's worker and drawn by
    the chat on the UI thread, in the order it was said."""

    def __init__(self, entry: ChatEntry) -> None:
        super().__init__()
        self.entry = entry


class TokenStreamed(ReplyEvent):
    def __init__(self, entry: ChatEntry, text: str) -> None:
        super().__init__(entry)
        self.text = text


class ReplyWaiting(ReplyEvent):
    def __init__(self, entry: ChatEntry, job: str) -> None:
        super().__init__(entry)
        self.job = job


class ReplyPrepared(ReplyEvent):
    def __init__(self, entry: ChatEntry, prepared: dict[str, Any], precision: str) -> None:
        super().__init__(entry)
        self.prepared = prepared
        self.precision = precision


class ReplyFinished(ReplyEvent):
    def __init__(self, entry: ChatEntry, answer: TutorAnswer) -> None:
        super().__init__(entry)
        self.answer = answer


class ReplyFailed(ReplyEvent):
    def __init__(self, entry: ChatEntry, why: str) -> None:
        super().__init__(entry)
        self.why = why


class ReplyCut(ReplyEvent):
    """The engine died mid-reply: ``text`` arrived before it did."""

    def __init__(self, entry: ChatEntry, text: str, why: str) -> None:
        super().__init__(entry)
        self.text = text
        self.why = why


@work(thread=True, group="reply")
def answer(chat: ChatView, entry: ChatEntry, question: str, request_id: str, precision: str) -> None:
    """Ask the engine ``question`` at ``precision`` and post what it says to ``chat``, for ``entry``."""
    from tutor.assistant.grounding import TutorAnswer

    client = chat.runtime.client
    assert client is not None
    pieces: list[str] = []
    flushed = 0.0
    try:
        for event in client.ask(
            question, lesson_id=chat.lesson.id, precision=precision, request_id=request_id
        ):
            if event.name == "token":
                pieces.append(clean(event.data["text"]))
                if time.monotonic() - flushed >= FLUSH_S:
                    flushed = time.monotonic()
                    chat.post_message(TokenStreamed(entry, "".join(pieces)))
            elif event.name == "prepared":
                chat.post_message(ReplyPrepared(entry, event.data, precision))
            elif event.name == "waiting":
                chat.post_message(ReplyWaiting(entry, event.data["job"]))
            elif event.name == "answer":
                chat.post_message(ReplyFinished(entry, TutorAnswer.from_dict(event.data)))
            elif event.name == "error":
                chat.post_message(ReplyFailed(entry, event.data["message"]))
    except EngineGone as exc:
        chat.runtime.connection_lost(str(exc))
        chat.post_message(ReplyCut(entry, "".join(pieces), chat.runtime.error))
        chat.app.post_message(TutorStatus())
    except EngineRefused as exc:
        chat.post_message(ReplyFailed(entry, str(exc)))
    finally:
        if chat.reply_id == request_id:
            chat.reply_id = None
