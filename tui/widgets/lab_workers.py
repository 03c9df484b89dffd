"""The Lab's two jobs on the engine, each in a worker thread: a measurement of the quality cliff
(``measure``) and one question answered at every precision (``compare``).

What they report arrives as messages, which the Lab draws on the UI thread in the order they
came. Each job closes its stream when its stop flag is set (Esc, or the learner left the tab),
which cancels it in the engine; ``lab.requests`` holds the request id in flight, for a cancel.
"""

from __future__ import annotations

import threading
import uuid
from typing import TYPE_CHECKING, Any

from textual import work
from textual.message import Message

from tui.messages import TutorStatus
from tutor.engine.client import EngineGone, EngineRefused
from tutor.engine.precisions import MEASURED
from tutor.lab.sections import Section

if TYPE_CHECKING:
    from tui.widgets.lab_view import LabView
    from tutor.assistant.grounding import TutorAnswer

LAB_PRECISIONS = list(MEASURED)
# Compared answers stop after two sentences (the chat's stop after three): four columns side by
# side read as one comparison, and on a CPU without AVX-512 the three quantized answers take a
# third less waiting.
COMPARE_SENTENCES = 2


# What the Lab's workers report, drawn by the Lab on the UI thread in the order it arrived.


class MeasureProgress(Message):
    def __init__(self, plan: str, data: dict[str, Any]) -> None:
        super().__init__()
        self.plan, self.data = plan, data


class MeasureRow(Message):
    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__()
        self.data = data


class MeasureSection(Message):
    def __init__(self, section: Section) -> None:
        super().__init__()
        self.section = section


class MeasureResult(Message):
    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__()
        self.data = data


class MeasureDone(Message):
    def __init__(self, outcome: str) -> None:
        super().__init__()
        self.outcome = outcome  # "" when the result came, else why it stopped


class CompareColumn(Message):
    def __init__(self, precision: str, answers: dict[str, TutorAnswer]) -> None:
        super().__init__()
        self.precision, self.answers = precision, answers


class CompareDone(Message):
    def __init__(self, unanswered: list[str]) -> None:
        super().__init__()
        self.unanswered = unanswered


@work(thread=True, exclusive=True, group="lab")
def measure(lab: LabView, plan: str, stop: threading.Event) -> None:
    """Measure ``plan`` at every Lab precision, posting progress, rows, sections and the result;
    then ``MeasureDone``, whatever happened."""
    client = lab.runtime.client
    assert client is not None
    outcome = "Measuring stopped."
    try:
        request_id = lab.requests["measure"] = uuid.uuid4().hex
        events = client.cliff(plan, LAB_PRECISIONS, request_id=request_id)
        try:
            for event in events:
                if stop.is_set():
                    break  # closing the stream cancels the measurement in the engine
                if event.name == "progress":
                    lab.post_message(MeasureProgress(plan, event.data))
                elif event.name == "row":
                    lab.post_message(MeasureRow(event.data))
                elif event.name == "section":
                    lab.post_message(MeasureSection(Section.from_dict(event.data)))
                elif event.name == "result":
                    lab.post_message(MeasureResult(event.data))
                    outcome = ""
                elif event.name == "error":
                    outcome = f"Measuring failed: {event.data['message']}"
        finally:
            events.close()  # type: ignore[attr-defined]
    except EngineGone as exc:
        engine_gone(lab, str(exc))
        outcome = f"Measuring stopped: {lab.runtime.error}. Press m again: the engine restarts."
    except EngineRefused as exc:
        outcome = f"Measuring failed: {exc}"
    lab.requests.pop("measure", None)
    lab.post_message(MeasureDone(outcome))


def engine_gone(lab: LabView, why: str) -> None:
    """From a worker: the engine broke off; the header and Tutor tab say so too."""
    lab.runtime.connection_lost(why)
    lab.app.post_message(TutorStatus())


@work(thread=True, exclusive=True, group="compare")
def compare(lab: LabView, question: str, stop: threading.Event) -> None:
    """Answer ``question`` at each Lab precision in turn, posting each column as it is answered;
    then ``CompareDone`` with the precisions left unanswered."""
    from tutor.assistant.grounding import TutorAnswer

    client = lab.runtime.client
    assert client is not None
    answers: dict[str, TutorAnswer] = {}
    try:
        for precision in LAB_PRECISIONS:  # each question names its precision: nothing to switch back
            if stop.is_set():
                break
            request_id = lab.requests["compare"] = uuid.uuid4().hex
            events = client.ask(
                question,
                lesson_id=lab.lesson.id,
                precision=precision,
                request_id=request_id,
                max_sentences=COMPARE_SENTENCES,
            )
            try:
                for event in events:
                    if stop.is_set():
                        break  # closing the stream cancels the answer in the engine
                    if event.name == "answer":
                        answers[precision] = TutorAnswer.from_dict(event.data)
                    elif event.name == "error":
                        raise EngineRefused(event.data["message"])
            finally:
                events.close()  # type: ignore[attr-defined]
            if stop.is_set():
                break
            lab.post_message(CompareColumn(precision, dict(answers)))
    except EngineGone as exc:
        engine_gone(lab, str(exc))
        lab.app.call_from_thread(lab.notify, f"Compare stopped: {lab.runtime.error}", severity="error")
    except EngineRefused as exc:
        lab.app.call_from_thread(lab.notify, f"Compare stopped: {exc}", severity="error")
    lab.requests.pop("compare", None)
    lab.post_message(CompareDone([p for p in LAB_PRECISIONS if p not in answers]))
