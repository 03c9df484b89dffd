"""The wheel is the product: built from this checkout and installed outside it, it has every lesson.

An editable install finds ``content/`` in the checkout whatever the packaging says, so this
builds the wheel, installs it (without dependencies) into a fresh virtual environment in a
temporary folder, and runs the plain commands from there. The dependencies, identical to the
ones the wheel declares, are borrowed from the test environment by a path entry; ``pip check``
confirms the wheel's requirements are met by them. Nothing here can see the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.conftest import ROOT, SEED
from tutor.library.content import Library


def test_a_wheel_installed_elsewhere_ships_every_lesson(library: Library, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["QUANT_TUTOR_HOME"] = str(tmp_path / "home")

    def run(*args: str | Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
        command = [str(a) for a in args]
        return subprocess.run(command, cwd=tmp_path, env=env, input=stdin, capture_output=True, text=True)

    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                tmp_path / "dist", ROOT)  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("quant_tutor-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for folder in sorted(p for p in (ROOT / "content").iterdir() if (p / "lesson.md").exists()):
        for name in ("lesson.md", "quiz.yaml"):
            wanted = f"tutor/lessons/{folder.name}/{name}"
            assert wanted in shipped, f"{folder.name}/{name} is not in the wheel"
    assert "tutor/lessons/eval_questions.yaml" in shipped, "the Lab's QA set is not in the wheel"
    assert "tutor/engine/native/decode_step.cpp" in shipped, (
        "the native decode step's source is not in the wheel"
    )

    venv = tmp_path / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv)  # this pip installs into it
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    # Only the folder: its .pth files (this checkout's editable install among them) are not read.
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = (sys.executable, "-m", "pip", "--python", python)
    installed = run(*pip, "install", "--no-deps", "-q", wheel)
    assert installed.returncode == 0, installed.stderr
    checked = run(*pip, "check")
    assert "quant-tutor" not in checked.stdout, checked.stdout

    app = venv / "bin" / "quant-tutor"
    where = run(python, "-c", "import tutor.library.content as c; print(c.default_content_dir())")
    assert where.stdout.strip().startswith(str(site)), f"lessons found outside the installed wheel: {where}"
    lessons = run(app, "lessons", "--json")
    assert lessons.returncode == 0, lessons.stderr
    assert [row["id"] for row in json.loads(lessons.stdout)] == list(library.lessons)
    read = run(app, "read", SEED)
    assert read.returncode == 0 and read.stdout.startswith(library.get(SEED).title), read.stderr
    answers = "\n".join(q.answer for q in library.get(SEED).questions) + "\n"
    quiz = run(app, "quiz", SEED, "--plain", stdin=answers)
    assert quiz.returncode == 0, quiz.stderr
    assert quiz.stdout.rstrip().endswith("Score: 10/10")
