"""Plain mode through the installed console script, as a screen reader or script uses it."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from tests.conftest import ROOT, SEED
from tutor import cli
from tutor.library.content import Library
from tutor.library.models import LETTERS

SCRIPT = Path(sys.executable).with_name("quant-tutor")


def qt(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], input=stdin, capture_output=True, text=True, timeout=60, env=os.environ.copy()
    )


def _answers(library: Library, right: int) -> list[str]:
    questions = library.get(SEED).questions
    return [
        q.answer if i < right else LETTERS[(q.correct_index + 1) % len(q.choices)]
        for i, q in enumerate(questions)
    ]


def test_lessons_json_and_read(library: Library) -> None:
    result = qt("lessons", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows[0] == {"id": SEED, "title": library.get(SEED).title, "minutes": 7}
    assert len(rows) == 4
    text = qt("read", SEED).stdout
    assert text.startswith(library.get(SEED).title)
    assert "What quantization cannot do\n===========================\n" in text, "headings are underlined"
    assert "## " not in text and "|---" not in text and "**" not in text, "no Markdown syntax is left"
    assert "FP32                       32                        about 28 GB" in text, "tables are columns"
    assert "open the Precision lab (key b)" in text, "a link reads as its words"


def test_plain_quiz_end_to_end(library: Library) -> None:
    answers = _answers(library, right=7)
    answers.insert(2, "zz")  # a bad line is explained, then the question is asked again
    result = qt("quiz", SEED, "--plain", stdin="\n".join(answers) + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Question 1 of 10:" in out and "Question 10 of 10:" in out
    assert "'zz' is not a choice" in out
    assert out.count("✓ Correct.") == 7 and out.count("✗ Not quite.") == 3
    first = library.get(SEED).questions[0]
    assert f"Your answer (1–4 or a–d): {first.answer}\nYou chose {first.answer}) " in out, (
        "piped answers echoed"
    )
    assert out.count("Question 3 of 10:") == 1, "a bad line asks for the answer again, not the whole question"
    assert "\nScore: 7/10\n" in out and out.rstrip().endswith(f"quant-tutor quiz {SEED} --plain --review")

    progress = json.loads(qt("progress", "--json").stdout)
    assert progress[SEED]["best_score"] == 7 and progress[SEED]["attempts"] == 1


def test_plain_quiz_stopped_early_resumes(library: Library) -> None:
    answers = _answers(library, right=10)
    first = qt("quiz", SEED, "--plain", stdin="\n".join(answers[:4]) + "\n")
    assert first.returncode == 1
    assert "Stopped after 4 of 10; your answers are saved" in first.stdout
    second = qt("quiz", SEED, "--plain", stdin="\n".join(answers[4:]) + "\n")
    assert "Resuming your unfinished quiz" in second.stdout
    assert "Question 5 of 10:" in second.stdout and "Question 4 of 10:" not in second.stdout
    assert second.stdout.rstrip().endswith("Score: 10/10")
    assert (
        "Your last finished attempt had no wrong answers." in qt("quiz", SEED, "--plain", "--review").stdout
    )


def test_progress_in_words() -> None:
    assert f"{SEED}: read 0%, steps 0/3, quiz not taken" in qt("progress").stdout
    qt("quiz", SEED, "--plain", stdin="a\n" * 10)
    assert "over 1 attempt\n" in qt("progress").stdout


def test_clear_errors() -> None:
    result = qt("read", "no-such-lesson")
    assert result.returncode == 2
    assert "no lesson 'no-such-lesson'" in result.stderr and "Traceback" not in result.stderr
    assert qt("quiz", SEED).returncode == 2


def test_schema_command() -> None:
    schema = json.loads(qt("schema").stdout)
    assert set(schema) == {"lesson.md front matter", "quiz.yaml"}


def _modules_loaded_by(code: str) -> str:
    """Run ``code`` in a fresh interpreter; it prints the modules it is asked about."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_start_up_never_imports_heavy_libraries() -> None:
    heavy = "{'torch', 'transformers', 'sentence_transformers', 'bitsandbytes'}"
    code = (
        "import sys, tui.entry, tui.app, tutor.cli, tutor.progress.store, tutor.progress.quiz, "
        "tutor.library.content; "
        f"print(sorted({heavy} & set(sys.modules)))"
    )
    assert _modules_loaded_by(code) == "[]"


def test_domain_never_imports_textual() -> None:
    code = (
        "import sys, pkgutil, importlib, tutor; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(tutor.__path__, 'tutor.')]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'tui')))"
    )
    assert _modules_loaded_by(code) == "[]"


def test_bench_options_reach_the_bench() -> None:
    result = qt("bench", "--help")
    assert result.returncode == 0 and "--tokens" in result.stdout and "--precisions" in result.stdout
    assert "bench" in qt("--help").stdout
    app = qt("bench", "--app", "--help")  # the app's own bench (tui.app_bench), handed in by tui.entry
    assert (
        app.returncode == 0 and "The Tutor tab's decode speed" in app.stdout and "--tokens" not in app.stdout
    )
    assert "--rounds" in app.stdout
    none = qt("bench", "--app", "--rounds", "0")
    assert none.returncode == 2 and "--rounds" in none.stderr and "Traceback" not in none.stderr


def _modules_after(*argv: str) -> list[str]:
    """The heavy or app modules a fresh console-script process has loaded after running ``argv``."""
    code = (
        "import contextlib, io, sys; from tui.entry import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()): status = main({list(argv)!r})\n"
        "assert status == 0, status\n"
        "heavy = ('torch', 'transformers', 'sentence_transformers', 'textual', 'tutor.engine', 'tui.')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy) and m != 'tui.entry'))"
    )
    return json.loads(_modules_loaded_by(code).replace("'", '"'))


def test_plain_commands_and_version_never_import_the_engine_or_textual() -> None:
    for argv in (["--version"], ["--help"], ["lessons"], ["read", SEED], ["progress"]):
        assert _modules_after(*argv) == [], argv
    assert _modules_after("quiz", SEED, "--plain", "--review") == []
    assert "tutor.engine" in _modules_after("ask", "--help"), "the commands that load the model load it"


def test_no_command_opens_the_app_through_the_callback_it_was_handed() -> None:
    code = (
        "import sys; from tutor import cli\n"
        "seen = []\n"
        "app = lambda options: seen.append(options) or 7\n"
        "status = cli.run(['--content', 'content', '--device', 'cuda'], open_app=app)\n"
        "print(status, seen[0].content, seen[0].device, seen[0].lesson,"
        " sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'tui', 'torch')))"
    )
    assert _modules_loaded_by(code) == "7 content cuda None []"


def test_no_command_without_the_app_says_what_there_is(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run([]) == 0
    assert "Commands:" in capsys.readouterr().out


def test_every_command_loads_and_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Click's advice for a lazy group: each command's --help, so each one imports."""
    names = cli.quant_tutor.list_commands(click.Context(cli.quant_tutor))
    assert " ".join(names) == "lessons read quiz progress schema validate ask cliff eval bench serve warm"
    for name in names:
        assert cli.run([name, "--help"]) == 0, name
        assert f"Usage: quant-tutor {name} [OPTIONS]" in capsys.readouterr().out


def test_usage_errors_name_the_bad_option_or_value(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, named in [
        (["cliff", "--plan", "nope"], ["'--plan'", "'nope'"]),
        (["cliff", "--window", "x"], ["'--window'", "'x'", "integer"]),
        (["lessons", "--nope"], ["No such option", "--nope"]),
        (["read"], ["Missing argument", "LESSON"]),
        (["nope"], ["No such command", "'nope'"]),
        (["bench", "--app"], ["No such option", "--app"]),  # no app handed in: the engine's bench alone
    ]:
        assert cli.run(argv) == 2, argv
        err = capsys.readouterr().err
        assert all(word in err for word in named) and "Traceback" not in err, err


def _pty_run(args: list[str], answers: list[str]) -> str:
    """Run the console script in a pseudo-terminal, typing each answer once its prompt shows;
    what the terminal showed (its own echo of the typed keys included) comes back."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(SCRIPT), *args], stdin=slave, stdout=slave, stderr=slave, env=os.environ.copy()
    )
    os.close(slave)
    screen = b""
    pending = list(answers)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed its side
                    break
                if not chunk:
                    break
                screen += chunk
            if pending and screen.count(b"Your answer (") > len(answers) - len(pending):  # a new prompt
                os.write(master, pending.pop(0).encode() + b"\r")
            if proc.poll() is not None and not ready:
                break
    finally:
        os.close(master)
        proc.wait(timeout=10)
    return screen.decode().replace("\r\n", "\n")


def test_plain_quiz_in_a_terminal_echoes_the_answer_then_reviews_it(library: Library) -> None:
    lesson = library.get(SEED)
    answers = _answers(library, right=8)
    shown = _pty_run(["quiz", SEED, "--plain"], ["9", *answers])
    first = lesson.questions[0]
    assert "Your answer (1–4 or a–d): 9\n'9' is not a choice. This question has 4 choices" in shown
    right = first.choices[first.correct_index].text
    assert f"Your answer (1–4 or a–d): {first.answer}\nYou chose {first.answer}) {right}\n" in shown, (
        "the terminal's echo, once, then the choice in words"
    )
    assert "Score: 8/10" in shown

    review = _pty_run(["quiz", SEED, "--plain", "--review"], [])
    assert "Your last finished attempt: 2 wrong answers." in review
    for question, answer in zip(lesson.questions[8:], answers[8:], strict=True):
        assert question.stem in review
        assert f"✗ You answered {answer}) {question.choices['abcd'.index(answer)].text}" in review
        assert f"✓ The answer is {question.answer}) " in review


def test_ask_on_an_unreachable_engine_says_so_in_one_line(tmp_path: Path) -> None:
    gone = qt("ask", "What is NF4?", "--engine", "http://127.0.0.1:9/v1")
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    assert "cannot reach the engine at http://127.0.0.1:9/v1" in gone.stderr
    assert "Loading the lesson index" not in gone.stderr, "the server is reached before the index loads"
    (tmp_path / "v.toml").write_text("bf16 = 3\n")
    bad = qt(
        "ask", "What is NF4?", "--engine", "http://127.0.0.1:9/v1", "--variants", str(tmp_path / "v.toml")
    )
    assert bad.returncode == 2 and 'each line must be precision = "served model id"' in bad.stderr
    before = qt("--engine", "http://127.0.0.1:9/v1", "ask", "What is NF4?")  # an option before the command
    assert before.returncode == 2 and "cannot reach the engine at http://127.0.0.1:9/v1" in before.stderr
    config = Path(os.environ["QUANT_TUTOR_HOME"]) / "config" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('[engine]\nurl = "http://127.0.0.1:9/v1"\n')
    configured = qt("ask", "What is NF4?")  # the config file's server, with no --engine
    assert (
        configured.returncode == 2 and "cannot reach the engine at http://127.0.0.1:9/v1" in configured.stderr
    )


def test_the_app_refuses_bad_remote_options_before_it_starts(tmp_path: Path) -> None:
    alone = qt("--variants", str(tmp_path / "v.toml"))
    assert alone.returncode == 2 and "--variants names the variants of an --engine URL" in alone.stderr
    (tmp_path / "v.toml").write_text("bf16 = [\n")
    bad = qt("--engine", "http://127.0.0.1:9/v1", "--variants", str(tmp_path / "v.toml"))
    assert bad.returncode == 2 and "cannot read the variants file" in bad.stderr
    assert "Traceback" not in alone.stderr + bad.stderr


def test_warm_caches_the_index_and_gptq4_so_a_second_run_waits_for_neither(
    home: Path, model_cache: Path, shared_engine: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make install`` runs ``warm``: the app then opens ready and the Lab's first full measure
    does not calibrate. The model's conversion and the native extension's build are the
    session's (``shared_engine`` made them; a build took 60-115 s on a 2-core AVX2 EPYC). In
    this process, on 8 calibration windows of the 32: as a console script, on all 32, this
    test took 98 s of the suite's 10 min on that machine, its calibration 36 s. On one lesson:
    embedding the shipped four's quotable sentences here took 30 s more."""
    import shutil

    from click.testing import CliRunner, Result

    from tutor.assistant.grounding import quotable_texts
    from tutor.assistant.retrieval import Retriever
    from tutor.engine import calibration
    from tutor.library.content import load_library

    monkeypatch.setattr(calibration, "WINDOWS", 8)
    (home / "cache").mkdir(parents=True)
    for made in ("models", "native"):
        (home / "cache" / made).symlink_to(model_cache / made, target_is_directory=True)

    content = home / "content"
    shutil.copytree(ROOT / "content" / SEED, content / SEED)

    def warm() -> Result:
        return CliRunner().invoke(cli.quant_tutor, ["--content", str(content), "warm"])

    first = warm()
    assert first.exit_code == 0, first.stderr
    assert "gptq4: calibrated in" in first.stderr
    assert list((home / "cache" / "quantized").glob("gptq4-*.safetensors"))
    assert any((home / "cache" / "index").glob("*.npz"))
    # The lessons' quotable sentences are kept: a question embeds only itself.
    retriever = Retriever.load(load_library(content), cache_dir=home / "cache")
    texts = quotable_texts(retriever, [SEED])
    assert len(texts) > 100 and retriever.embedder.store is not None
    assert len(retriever.embedder.store.get(texts)) == len(texts)
    again = warm()
    assert again.exit_code == 0, again.stderr
    assert "Calibrating" not in again.stderr and "Ready:" in again.stderr
