"""The progress store: upgrades, crash safety, corrupt files, concurrent writers, lesson state."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tutor.progress import database, schema
from tutor.progress.errors import StoreError
from tutor.progress.records import AnswerRecord, LessonProgress, LessonSummary
from tutor.progress.schema import SCHEMA_VERSION
from tutor.progress.store import Store

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "progress.sqlite3"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store(db)
    yield s
    s.close()


def user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def answer_log(path: Path, lesson_id: str | None = None) -> list[tuple[Any, ...]]:
    """The answers in the file, oldest first, as (attempt, lesson, question, choice, correct, seconds)."""
    sql = "SELECT attempt_id, lesson_id, question_id, choice, correct, seconds FROM answers"
    conn = sqlite3.connect(path)
    try:
        if lesson_id is None:
            return conn.execute(f"{sql} ORDER BY answer_id").fetchall()
        return conn.execute(f"{sql} WHERE lesson_id = ? ORDER BY answer_id", (lesson_id,)).fetchall()
    finally:
        conn.close()


def attempt_states(path: Path, lesson_id: str) -> list[str]:
    """Each attempt at the lesson in the file, oldest first: finished, abandoned or open."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT finished_at, abandoned_at FROM attempts WHERE lesson_id = ? ORDER BY attempt_id",
            (lesson_id,),
        ).fetchall()
    finally:
        conn.close()
    return ["finished" if finished else "abandoned" if abandoned else "open" for finished, abandoned in rows]


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


def child(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=full_env,
    )


def expect_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if not line.startswith(prefix):
        proc.kill()
        pytest.fail(f"child said {line!r}, expected {prefix!r}; stderr:\n{proc.stderr.read()}")
    return line


# --- opening and upgrades ----------------------------------------------------------------


def test_fresh_database_is_at_latest_version_in_wal_mode(db: Path) -> None:
    with Store(db) as s:
        assert s.path == db
        assert s.moved_aside is None and s.notice is None
    assert user_version(db) == SCHEMA_VERSION
    assert {"attempts", "answers", "lessons", "steps"} <= tables(db)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_default_location_honours_quant_tutor_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANT_TUTOR_HOME", str(tmp_path / "home"))
    with Store() as s:
        assert s.path == tmp_path / "home" / "data" / "progress.sqlite3"
        s.touch_lesson("x")
    assert s.path.is_file()


def test_creates_missing_parent_folders(tmp_path: Path) -> None:
    with Store(tmp_path / "a" / "b" / "progress.sqlite3") as s:
        s.touch_lesson("x")
        assert s.last_lesson() == "x"


@pytest.mark.parametrize("how", ["empty file", "header, no tables"])
def test_version_0_database_without_tables_is_upgraded(db: Path, how: str) -> None:
    if how == "empty file":
        db.touch()
    else:
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE scratch (x)")
        conn.execute("DROP TABLE scratch")
        conn.commit()
        conn.close()
        assert db.stat().st_size > 0 and user_version(db) == 0
    with Store(db) as s:
        assert s.moved_aside is None and s.notice is None
        s.touch_lesson("x")
    assert user_version(db) == SCHEMA_VERSION


def test_newer_user_version_is_moved_aside_not_downgraded(db: Path) -> None:
    with Store(db) as s:
        s.save_note("lesson", 0, "written by the future")
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with Store(db) as s:
        assert s.moved_aside is not None and s.moved_aside.is_file()
        assert s.moved_aside.name.startswith("progress.sqlite3.corrupt-")
        assert s.notice is not None and "newer version" in s.notice and str(s.moved_aside) in s.notice
        assert s.lesson("lesson").notes == {}
        moved = s.moved_aside
    assert user_version(moved) == SCHEMA_VERSION + 5  # untouched
    conn = sqlite3.connect(moved)
    assert conn.execute("SELECT note FROM steps").fetchall() == [("written by the future",)]
    conn.close()
    assert user_version(db) == SCHEMA_VERSION


def test_foreign_sqlite_database_is_moved_aside(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE someone_elses (x)")
    conn.commit()
    conn.close()
    with Store(db) as s:
        assert s.moved_aside is not None
        assert s.notice is not None and "not a quant-tutor" in s.notice
    assert tables(s.moved_aside) == {"someone_elses"}


def test_appended_migration_step_upgrades_existing_database(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(db) as s:
        s.save_note("lesson", 1, "keep me")
    steps = [*schema.MIGRATIONS, schema.sql_step("ALTER TABLE steps ADD COLUMN colour TEXT")]
    monkeypatch.setattr(schema, "MIGRATIONS", steps)
    with Store(db) as s:
        assert s.moved_aside is None
        assert user_version(db) == SCHEMA_VERSION + 1
        assert s.lesson("lesson").notes == {1: "keep me"}
    conn = sqlite3.connect(db)
    assert "colour" in {r[1] for r in conn.execute("PRAGMA table_info(steps)")}
    conn.close()


def test_failing_migration_rolls_back_whole_upgrade(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(db) as s:
        s.save_note("lesson", 1, "keep me")
    broken = schema.sql_step("CREATE TABLE half_done (x)", "SELECT * FROM no_such_table")
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, broken])
    with pytest.raises(StoreError, match="left unchanged"):
        Store(db)
    assert db.is_file() and not list(db.parent.glob("*.corrupt-*"))
    assert user_version(db) == SCHEMA_VERSION
    assert "half_done" not in tables(db)
    monkeypatch.undo()
    with Store(db) as s:
        assert s.lesson("lesson").notes == {1: "keep me"}


# --- crash safety ------------------------------------------------------------------------

KILL_SCRIPT = """
import time
from tutor.progress.store import Store
s = Store()
a = s.start_attempt("lesson-a", ["q1", "q2", "q3", "q4", "q5", "q6"])
for i, q in enumerate(["q1", "q2", "q3", "q4"]):
    s.record_answer(a, q, "abcd"[i], i % 2 == 0, 1.5 + i)
s.save_note("lesson-a", 0, "half-written thought")
print("ready", a, flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_mid_quiz_loses_nothing_and_offers_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    proc = child(KILL_SCRIPT, env={"QUANT_TUTOR_HOME": str(home)})
    try:
        attempt_id = int(expect_line(proc, "ready").split()[1])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    monkeypatch.setenv("QUANT_TUTOR_HOME", str(home))
    with Store() as s:
        assert s.moved_aside is None
        resume = s.open_attempt("lesson-a")
        assert resume is not None
        assert resume.attempt_id == attempt_id and resume.kind == "full"
        assert resume.question_ids == ("q1", "q2", "q3", "q4", "q5", "q6")
        assert sorted(resume.answers) == ["q1", "q2", "q3", "q4"]
        assert resume.unanswered == ("q5", "q6")
        assert answer_log(s.path) == [
            (attempt_id, "lesson-a", "q1", "a", True, 1.5),
            (attempt_id, "lesson-a", "q2", "b", False, 2.5),
            (attempt_id, "lesson-a", "q3", "c", True, 3.5),
            (attempt_id, "lesson-a", "q4", "d", False, 4.5),
        ]
        assert s.lesson("lesson-a").notes == {0: "half-written thought"}
        # resume and finish
        s.record_answer(attempt_id, "q5", "a", True, 1.0)
        s.record_answer(attempt_id, "q6", "a", True, 1.0)
        assert s.finish_attempt(attempt_id) == 4
        assert s.open_attempt("lesson-a") is None


# --- corrupt and unreadable files ---------------------------------------------------------


def test_garbage_file_is_moved_aside_with_side_files(db: Path) -> None:
    garbage = b"this is not an SQLite database, just some bytes\n" * 200
    db.write_bytes(garbage)
    Path(f"{db}-wal").write_bytes(b"stale wal")
    Path(f"{db}-shm").write_bytes(b"stale shm")
    with Store(db) as s:
        moved = s.moved_aside
        assert moved is not None and moved.parent == db.parent
        assert moved.name.startswith("progress.sqlite3.corrupt-") and moved.name.endswith("Z")
        assert moved.read_bytes() == garbage
        assert Path(f"{moved}-wal").read_bytes() == b"stale wal"
        assert Path(f"{moved}-shm").read_bytes() == b"stale shm"
        assert s.notice is not None
        assert str(moved) in s.notice and str(db) in s.notice and "fresh" in s.notice
        # the fresh store works
        a = s.start_attempt("lesson", ["q1"])
        s.record_answer(a, "q1", "a", True, 2.0)
        assert s.finish_attempt(a) == 1
    assert user_version(db) == SCHEMA_VERSION
    # reopening the healthy fresh file says nothing
    with Store(db) as s:
        assert s.moved_aside is None and s.notice is None
        assert s.lesson("lesson").best_score == 1


def test_truncated_database_is_moved_aside_bytes_intact(db: Path) -> None:
    with Store(db) as s:
        a = s.start_attempt("lesson", [f"q{i}" for i in range(300)])
        for i in range(300):
            s.record_answer(a, f"q{i}", "b" * 40, True, 1.0)
            s.save_note("lesson", i, "a note that takes some room " * 3)
    data = db.read_bytes()
    assert len(data) > 16 * 4096
    truncated = data[: len(data) // 2]
    db.write_bytes(truncated)
    with Store(db) as s:
        assert s.moved_aside is not None
        assert s.moved_aside.read_bytes() == truncated
        assert s.notice is not None and str(s.moved_aside) in s.notice
        assert answer_log(db) == []


def test_second_move_aside_never_overwrites_the_first(db: Path) -> None:
    db.write_bytes(b"first garbage" * 100)
    with Store(db) as s:
        first = s.moved_aside
    db.unlink()
    for side in ("-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    db.write_bytes(b"second garbage" * 100)
    with Store(db) as s:
        second = s.moved_aside
    assert first is not None and second is not None and first != second
    assert first.read_bytes() == b"first garbage" * 100
    assert second.read_bytes() == b"second garbage" * 100


def test_directory_in_place_of_database_is_a_clear_error(db: Path) -> None:
    db.mkdir()
    (db / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="is a directory"):
        Store(db)
    assert (db / "keep.txt").read_text() == "mine"
    assert not list(db.parent.glob("*.corrupt-*"))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read anything")
def test_permission_denied_is_a_clear_error(db: Path) -> None:
    with Store(db) as s:
        s.save_note("lesson", 0, "private")
    before = db.read_bytes()
    db.chmod(0)
    try:
        with pytest.raises(StoreError, match="permission denied"):
            Store(db)
    finally:
        db.chmod(0o600)
    assert db.read_bytes() == before
    assert not list(db.parent.glob("*.corrupt-*"))


def test_unreadable_file_is_a_clear_error_not_moved(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same as the permission test, but runs as root too: the read is made to fail."""
    with Store(db) as s:
        s.save_note("lesson", 0, "private")

    real_open = open

    def denied(file: object, *args: Any, **kwargs: Any) -> Any:
        if Path(str(file)) == db:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(database, "open", denied, raising=False)
    with pytest.raises(StoreError, match="permission denied"):
        Store(db)
    monkeypatch.undo()
    assert not list(db.parent.glob("*.corrupt-*"))
    with Store(db) as s:
        assert s.lesson("lesson").notes == {0: "private"}


# --- two instances at once ----------------------------------------------------------------

WRITER_SCRIPT = """
import sys
from pathlib import Path
from tutor.progress.store import Store
path, who, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = Store(path)
qids = [f"q{i}" for i in range(n)]
a = s.start_attempt("lesson-" + who, qids)
print("ready", flush=True)
sys.stdin.readline()
for i, q in enumerate(qids):
    s.record_answer(a, q, "abcd"[i % 4], i % 2 == 0, 0.25)
    if i % 5 == 0:
        s.save_note("shared", i % 3, f"{who} {i}")
        s.save_note("lesson-" + who, i, f"note {i}")
        s.save_reading("shared", float(i), i / n)
        s.touch_lesson("lesson-" + who)
print("score", s.finish_attempt(a), flush=True)
s.close()
"""


def test_two_processes_writing_at_once(db: Path) -> None:
    n = 200
    procs = [child(WRITER_SCRIPT, str(db), who, str(n)) for who in ("one", "two")]
    try:
        for p in procs:
            expect_line(p, "ready")
        for p in procs:  # both start writing together
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            assert expect_line(p, "score").split() == ["score", str(n // 2)]
            _out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    with Store(db) as s:
        assert s.moved_aside is None
        assert len(answer_log(db)) == 2 * n
        for who in ("one", "two"):
            mine = answer_log(db, f"lesson-{who}")
            assert [row[2] for row in mine] == [f"q{i}" for i in range(n)]
            progress = s.lesson(f"lesson-{who}")
            assert progress.best_score == n // 2 and progress.attempts == 1
            assert len(progress.notes) == n // 5
        shared = s.lesson("shared")
        assert set(shared.notes) == {0, 1, 2}
        assert shared.read_fraction == pytest.approx((n - 5) / n)
        assert s.last_lesson() in {"lesson-one", "lesson-two"}


RACE_SCRIPT = """
import sys, time
from pathlib import Path
from tutor.progress.store import Store
path, who, start = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
while time.time() < start:
    pass
s = Store(path)
a = s.start_attempt("lesson-" + who, ["q1", "q2", "q3"])
for q in ("q1", "q2", "q3"):
    s.record_answer(a, q, "a", True, 1.0)
print("moved" if s.moved_aside else "fresh", flush=True)
"""


def test_instances_starting_together_on_a_corrupt_file_move_it_aside_once(db: Path) -> None:
    garbage = b"\x00garbage, not a database" * 300
    db.write_bytes(garbage)
    start = time.time() + 1.5  # time for all three to import; then they open together
    procs = [child(RACE_SCRIPT, str(db), str(k), str(start)) for k in range(3)]
    outcomes = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outcomes.append(out.strip())
    assert sorted(outcomes) == ["fresh", "fresh", "moved"]
    moved = [f for f in db.parent.iterdir() if f.name.startswith("progress.sqlite3.corrupt-")]
    assert [f.read_bytes() for f in moved] == [garbage]
    with Store(db) as s:
        assert s.moved_aside is None
        assert len(answer_log(db)) == 9


HOLDER_SCRIPT = """
import sys
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("holding", flush=True)
    sys.stdin.readline()
"""


def test_opening_waits_for_another_opener_then_gives_up_clearly(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another process holds the opening lock, a new instance waits for it; past the
    timeout it says so; once the lock is released, opening goes ahead, the data as it was."""
    with Store(db) as s:
        s.save_note("lesson", 0, "kept")
    lock = db.with_name(db.name + ".lock")
    holder = child(HOLDER_SCRIPT, str(lock))
    try:
        expect_line(holder, "holding")
        monkeypatch.setattr(database, "OPEN_LOCK_TIMEOUT_S", 1.0)
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"Another quant-tutor has been opening .* for over 1 s"):
            Store(db)
        assert time.monotonic() - started >= 0.9  # it waited, about the timeout
        monkeypatch.setattr(database, "OPEN_LOCK_TIMEOUT_S", 30.0)
        opened: list[Store] = []
        waiter = threading.Thread(target=lambda: opened.append(Store(db)))
        waiter.start()
        time.sleep(0.3)
        assert not opened, "it waits while the other instance is opening"
        assert holder.stdin is not None
        holder.stdin.write("done\n")
        holder.stdin.flush()
        waiter.join(timeout=30)
        [s] = opened
        assert s.lesson("lesson").notes == {0: "kept"}
        s.close()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()


def test_an_open_instance_does_not_hold_the_opening_lock(db: Path) -> None:
    """Only opening is serialised: a running instance leaves the lock free for the next one."""
    from filelock import FileLock

    with Store(db) as first:
        lock = FileLock(db.with_name(db.name + ".lock"), timeout=0)
        with lock:  # would raise Timeout if the open store still held it
            pass
        with Store(db) as second:
            first.save_note("lesson", 0, "one")
            assert second.lesson("lesson").notes == {0: "one"}


def test_lock_file_that_cannot_be_created_is_a_clear_error(db: Path) -> None:
    db.with_name(db.name + ".lock").mkdir()
    with pytest.raises(StoreError, match=r"Cannot create the lock file .*progress\.sqlite3\.lock"):
        Store(db)
    assert not db.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_lock_file_is_private_to_the_user(db: Path) -> None:
    old = os.umask(0o022)  # the usual umask would leave a plain new file readable by all
    try:
        Store(db).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(db.with_name(db.name + ".lock").stat().st_mode) == 0o600


def test_usable_from_several_threads(store: Store) -> None:
    attempt = store.start_attempt("lesson", [f"q{i}" for i in range(80)])
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(offset, 80, 4):
                store.record_answer(attempt, f"q{i}", "a", True, 1.0)
                store.save_note("lesson", offset, f"thread {offset} at {i}")
                store.lesson("lesson")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.attempt_answers(attempt)) == 80
    assert store.finish_attempt(attempt) == 80
    assert set(store.lesson("lesson").notes) == {0, 1, 2, 3}


# --- quiz ---------------------------------------------------------------------------------


def test_record_answer_returns_the_logged_row(store: Store) -> None:
    a = store.start_attempt("lesson", ["q1", "q2"])
    rec = store.record_answer(a, "q1", "c", False, 3.25)
    assert isinstance(rec, AnswerRecord)
    assert (rec.attempt_id, rec.lesson_id, rec.question_id, rec.choice, rec.correct, rec.seconds) == (
        a,
        "lesson",
        "q1",
        "c",
        False,
        3.25,
    )
    assert rec.answered_at.endswith("+00:00")
    assert store.attempt_answers(a) == [rec]
    assert answer_log(store.path) == [(a, "lesson", "q1", "c", False, 3.25)]


def test_reanswering_appends_and_latest_answer_counts(store: Store) -> None:
    a = store.start_attempt("lesson", ["q1", "q2", "q3"])
    store.record_answer(a, "q1", "a", False, 1.0)
    store.record_answer(a, "q1", "b", True, 1.0)
    store.record_answer(a, "q2", "a", True, 1.0)
    store.record_answer(a, "q2", "c", False, 1.0)
    resume = store.open_attempt("lesson")
    assert resume is not None
    assert {q: r.choice for q, r in resume.answers.items()} == {"q1": "b", "q2": "c"}
    assert len(store.attempt_answers(a)) == 4  # append-only
    assert store.finish_attempt(a) == 1  # q1 right (latest), q2 wrong (latest), q3 unanswered
    assert store.finish_attempt(a) == 1  # finishing again returns the stored score
    last = store.last_finished_attempt("lesson")
    assert last is not None and (last.attempt_id, last.state, last.score) == (a, "finished", 1)


def test_answers_log_is_append_only_in_the_database(store: Store, db: Path) -> None:
    a = store.start_attempt("lesson", ["q1"])
    store.record_answer(a, "q1", "a", True, 1.0)
    conn = sqlite3.connect(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE answers SET correct = 0")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM answers")
    conn.close()
    assert len(answer_log(store.path)) == 1


def test_record_answer_refuses_unknown_finished_abandoned_and_foreign(store: Store) -> None:
    with pytest.raises(StoreError, match="no quiz attempt 999"):
        store.record_answer(999, "q1", "a", True, 1.0)
    a = store.start_attempt("lesson", ["q1", "q2"])
    with pytest.raises(StoreError, match="not part of quiz attempt"):
        store.record_answer(a, "q9", "a", True, 1.0)
    store.record_answer(a, "q1", "a", True, 1.0)
    store.finish_attempt(a)
    with pytest.raises(StoreError, match="already finished"):
        store.record_answer(a, "q2", "a", True, 1.0)
    with pytest.raises(StoreError, match="already finished"):
        store.abandon_attempt(a)
    b = store.start_attempt("lesson", ["q1", "q2"])
    store.abandon_attempt(b)
    store.abandon_attempt(b)  # harmless
    with pytest.raises(StoreError, match="already abandoned"):
        store.record_answer(b, "q1", "a", True, 1.0)
    with pytest.raises(StoreError, match="abandoned"):
        store.finish_attempt(b)
    with pytest.raises(StoreError):
        store.attempt_answers(12345)
    assert len(answer_log(store.path)) == 1


def test_start_attempt_validates_arguments(store: Store) -> None:
    with pytest.raises(ValueError):
        store.start_attempt("lesson", ["q1"], kind="exam")
    with pytest.raises(ValueError):
        store.start_attempt("lesson", [])
    with pytest.raises(ValueError):
        store.start_attempt("lesson", ["q1", "q1"])


def test_open_attempt_is_the_latest_unfinished_one(store: Store) -> None:
    assert store.open_attempt("lesson") is None
    first = store.start_attempt("lesson", ["q1"])
    second = store.start_attempt("lesson", ["q1"])
    other = store.start_attempt("other", ["q1"])
    found = store.open_attempt("lesson")
    assert found is not None and found.attempt_id == second
    store.abandon_attempt(second)
    found = store.open_attempt("lesson")
    assert found is not None and found.attempt_id == first
    store.finish_attempt(first)
    assert store.open_attempt("lesson") is None
    found = store.open_attempt("other")
    assert found is not None and found.attempt_id == other


def test_scores_best_last_and_attempt_counts(store: Store) -> None:
    def full_attempt(correct: int, total: int = 4) -> int:
        a = store.start_attempt("lesson", [f"q{i}" for i in range(total)])
        for i in range(total):
            store.record_answer(a, f"q{i}", "a", i < correct, 1.0)
        return store.finish_attempt(a)

    fresh = store.lesson("lesson")
    assert (fresh.best_score, fresh.last_score, fresh.attempts) == (None, None, 0)
    assert full_attempt(3) == 3
    assert full_attempt(1) == 1
    abandoned = store.start_attempt("lesson", ["q0"])
    store.record_answer(abandoned, "q0", "a", True, 1.0)
    store.abandon_attempt(abandoned)
    store.start_attempt("lesson", ["q0"])  # still open: not counted
    review = store.start_attempt("lesson", ["q1", "q2"], kind="review")
    store.record_answer(review, "q1", "a", True, 1.0)
    store.record_answer(review, "q2", "a", True, 1.0)
    assert store.finish_attempt(review) == 2
    p = store.lesson("lesson")
    assert (p.best_score, p.last_score, p.attempts) == (3, 1, 2)
    assert full_attempt(2) == 2
    p = store.lesson("lesson")
    assert (p.best_score, p.last_score, p.attempts) == (3, 2, 3)
    assert attempt_states(store.path, "lesson") == [
        "finished",
        "finished",
        "abandoned",
        "open",
        "finished",
        "finished",
    ]


def test_review_attempt_resumes_after_reopen(db: Path) -> None:
    with Store(db) as s:
        full = s.start_attempt("lesson", ["q1", "q2", "q3", "q4"])
        for q, ok in [("q1", True), ("q2", False), ("q3", True), ("q4", False)]:
            s.record_answer(full, q, "a", ok, 1.0)
        s.finish_attempt(full)
        wrong = [r.question_id for r in s.attempt_answers(full) if not r.correct]
        review = s.start_attempt("lesson", wrong, kind="review")
        s.record_answer(review, "q2", "b", True, 4.0)
    with Store(db) as s:
        resume = s.open_attempt("lesson")
        assert resume is not None
        assert resume.attempt_id == review and resume.kind == "review"
        assert resume.question_ids == ("q2", "q4")
        assert set(resume.answers) == {"q2"} and resume.answers["q2"].correct
        assert resume.unanswered == ("q4",)
        s.record_answer(review, "q4", "c", True, 2.0)
        assert s.finish_attempt(review) == 2
        p = s.lesson("lesson")
        assert (p.best_score, p.last_score, p.attempts) == (2, 2, 1)  # reviews don't count


# --- lesson state -------------------------------------------------------------------------


def test_unseen_lesson_has_defaults(store: Store) -> None:
    assert store.lesson("never") == LessonProgress(
        lesson_id="never",
        read_fraction=0.0,
        scroll_y=0.0,
        steps_done=frozenset(),
        notes={},
        best_score=None,
        last_score=None,
        attempts=0,
        last_opened=None,
    )
    assert store.summaries() == {}
    assert store.last_lesson() is None
    assert store.lesson("never").marks == {}


def test_notes_are_saved_replaced_and_survive_reopen(db: Path) -> None:
    with Store(db) as s:
        s.save_note("lesson", 0, "first")
        s.save_note("lesson", 0, "first, revised ✓ — ünïcode")
        s.save_note("lesson", 2, "third step")
        s.save_note("other", 0, "elsewhere")
        s.save_note("lesson", 5, "")
    with Store(db) as s:
        assert s.lesson("lesson").notes == {0: "first, revised ✓ — ünïcode", 2: "third step"}
        assert s.lesson("other").notes == {0: "elsewhere"}
        s.save_note("lesson", 2, "")
        assert s.lesson("lesson").notes == {0: "first, revised ✓ — ünïcode"}


def test_marks_are_kept_with_the_notes(store: Store) -> None:
    store.save_note("lesson", 1, "my note")
    store.save_marks("lesson", 1, ["int4 is always fine.", "GGUF is a GPU kernel."])
    p = store.lesson("lesson")
    assert p.notes == {1: "my note"}
    assert p.marks == {1: ("int4 is always fine.", "GGUF is a GPU kernel.")}
    store.save_note("lesson", 1, "my note, edited")
    store.set_step_done("lesson", 1, True)
    p = store.lesson("lesson")
    assert p.marks == {1: ("int4 is always fine.", "GGUF is a GPU kernel.")}, "a note or done keeps them"
    assert p.steps_done == {1}
    store.save_marks("lesson", 1, [])
    p = store.lesson("lesson")
    assert p.marks == {} and p.notes == {1: "my note, edited"} and p.steps_done == {1}
    with pytest.raises(TypeError):
        store.save_marks("lesson", 1, "one string")


def test_steps_done_and_undone(store: Store) -> None:
    store.set_step_done("lesson", 0, True)
    store.set_step_done("lesson", 2, True)
    store.save_note("lesson", 1, "not done yet")
    assert store.lesson("lesson").steps_done == frozenset({0, 2})
    store.set_step_done("lesson", 0, False)
    assert store.lesson("lesson").steps_done == frozenset({2})
    assert store.lesson("lesson").notes == {1: "not done yet"}


def test_reading_progress_keeps_the_maximum_fraction(store: Store) -> None:
    store.save_reading("lesson", 120.0, 0.6)
    store.save_reading("lesson", 10.0, 0.1)
    p = store.lesson("lesson")
    assert p.read_fraction == pytest.approx(0.6)
    assert p.scroll_y == 10.0  # the last position, to restore
    store.save_reading("lesson", 400.0, 1.7)  # clamped
    assert store.lesson("lesson").read_fraction == 1.0
    store.save_reading("lesson", math.nan, math.nan)  # nonsense does not break anything
    p = store.lesson("lesson")
    assert p.read_fraction == 1.0 and p.scroll_y == 0.0


def test_touch_lesson_and_last_lesson(store: Store) -> None:
    store.touch_lesson("a")
    store.touch_lesson("b")
    assert store.last_lesson() == "b"
    store.touch_lesson("a")
    assert store.last_lesson() == "a"
    opened = store.lesson("a").last_opened
    assert opened is not None and opened.endswith("+00:00")
    store.save_reading("c", 1.0, 0.5)  # reading alone is not "opening"
    assert store.last_lesson() == "a"


def test_summaries_list_every_lesson_read_done_or_scored(store: Store) -> None:
    store.touch_lesson("read-only")
    store.set_step_done("done", 0, True)
    store.save_note("noted", 0, "x")  # a note alone is nothing to summarise
    a = store.start_attempt("quizzed", ["q1"])
    store.record_answer(a, "q1", "a", True, 1.0)
    store.finish_attempt(a)
    store.start_attempt("started", ["q1"])  # nor is an unfinished attempt
    summaries = store.summaries()
    assert list(summaries) == ["done", "quizzed", "read-only"]
    assert summaries["quizzed"].best_score == 1
    assert summaries["done"].steps_done == 1


def test_closed_store_raises_store_error(db: Path) -> None:
    s = Store(db)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.lesson("x")


def test_version_1_database_upgrades_keeping_its_data(db: Path) -> None:
    """A progress file written before settings and read parts existed opens with everything kept."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    schema.MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO lessons (lesson_id, read_fraction, scroll_y) VALUES ('old', 0.4, 12)")
    conn.execute("COMMIT")
    conn.close()
    with Store(db) as s:
        assert s.moved_aside is None and user_version(db) == SCHEMA_VERSION
        assert s.lesson("old").read_fraction == pytest.approx(0.4) and s.lesson("old").scroll_y == 12
        assert s.mark_read("old", [0], of=10) == pytest.approx(0.4), "a figure reached before is kept"
        assert s.setting("key_terms_shown", True) is True


def test_read_parts_add_up_across_sessions(store: Store) -> None:
    assert store.mark_read("lesson", [0, 1], of=10) == pytest.approx(0.2)
    assert store.mark_read("lesson", [1, 2, 99, -1], of=10) == pytest.approx(0.3), "out of range ignored"
    assert store.lesson("lesson").read_fraction == pytest.approx(0.3)
    store.save_reading("lesson", 50.0)  # the scroll position alone leaves the fraction as it was
    assert store.lesson("lesson").read_fraction == pytest.approx(0.3)


def test_settings_are_remembered(db: Path) -> None:
    with Store(db) as s:
        assert s.setting("key_terms_shown", True) is True
        s.save_setting("key_terms_shown", False)
    with Store(db) as s:
        assert s.setting("key_terms_shown", True) is False


def test_last_finished_attempt(store: Store) -> None:
    assert store.last_finished_attempt("lesson") is None
    first = store.start_attempt("lesson", ["q1", "q2"])
    store.record_answer(first, "q1", "b", False, 1.0)
    store.record_answer(first, "q2", "a", True, 1.0)
    store.finish_attempt(first)
    store.start_attempt("lesson", ["q1", "q2"])  # open, not finished: not the one to review
    last = store.last_finished_attempt("lesson")
    assert last is not None and last.attempt_id == first and last.score == 1


def test_cannot_create_the_data_folder_names_quant_tutor_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QUANT_TUTOR_HOME", str(blocker / "home"))
    with pytest.raises(StoreError, match="QUANT_TUTOR_HOME"):
        Store()
    with pytest.raises(StoreError, match="QUANT_TUTOR_HOME"):
        Store(blocker / "sub" / "progress.sqlite3")


def test_summaries_agree_with_each_lesson_and_use_the_new_indexes(store: Store, db: Path) -> None:
    """One grouped read for every lesson (the Progress and Library tabs of a big library) gives
    the figures the per-lesson read gives."""
    for number in range(60):
        lesson_id = f"lesson-{number}"
        store.mark_read(lesson_id, range(number % 5), of=4)
        if number % 3 == 0:
            store.set_step_done(lesson_id, 0, True)
        for score in range(number % 4):  # up to 3 finished attempts, scoring 0, 1, 2
            attempt = store.start_attempt(lesson_id, ["q1", "q2"])
            for question in ("q1", "q2")[:score]:
                store.record_answer(attempt, question, "a", True, 1.0)
            store.finish_attempt(attempt)
    summaries = store.summaries()
    assert len(summaries) == 60
    for lesson_id, summary in summaries.items():
        progress = store.lesson(lesson_id)
        assert summary.read_fraction == pytest.approx(progress.read_fraction)
        assert summary.steps_done == len(progress.steps_done)
        assert (summary.best_score, summary.last_score, summary.attempts) == (
            progress.best_score,
            progress.last_score,
            progress.attempts,
        )
    conn = sqlite3.connect(db)
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    assert {"attempts_finished", "lessons_by_open_seq"} <= names


def test_version_2_database_upgrades_to_the_indexes_keeping_its_data(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    schema.MIGRATIONS[0](conn)
    schema.MIGRATIONS[1](conn)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO lessons (lesson_id, read_fraction, open_seq) VALUES ('old', 0.5, 3)")
    conn.execute(
        "INSERT INTO attempts (lesson_id, kind, question_ids, started_at, finished_at, score) "
        "VALUES ('old', 'full', '[]', 't0', 't1', 7)"
    )
    conn.execute("COMMIT")
    conn.close()
    with Store(db) as s:
        assert user_version(db) == SCHEMA_VERSION == 3
        assert s.last_lesson() == "old"
        expected = LessonSummary(read_fraction=0.5, best_score=7, last_score=7, attempts=1)
        assert s.summaries()["old"] == expected
