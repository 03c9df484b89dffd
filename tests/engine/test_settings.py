"""Which engine the tutor generates with: the command line over the user's config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tutor.engine.remote import RemoteError, Variant
from tutor.engine.settings import EngineSettings, config_file, engine_settings


def _config(text: str) -> Path:
    path = config_file()
    path.write_text(text, encoding="utf-8")
    return path


def test_without_a_config_file_the_tutor_is_local(home: Path) -> None:
    assert not config_file().exists() and config_file().parent == home / "config"
    assert engine_settings() == EngineSettings()
    assert engine_settings("http://box:8000/v1/") == EngineSettings("http://box:8000/v1")


def test_the_config_file_names_a_server_and_the_command_line_overrides_it(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _config(
        '[engine]\nurl = "http://gpu:8000/v1"\ntimeout_s = 30\n'
        '[engine.variants]\nbf16 = "qwen-7b"\n'
        'nf4 = { model = "qwen-7b-bnb-4bit", url = "http://gpu:8001/v1/" }\n'
    )
    monkeypatch.setenv("QUANT_TUTOR_REMOTE_KEY", "sk-test")
    found = engine_settings()
    variants = {"bf16": Variant("qwen-7b"), "nf4": Variant("qwen-7b-bnb-4bit", "http://gpu:8001/v1")}
    assert found == EngineSettings("http://gpu:8000/v1", variants, 30.0)
    assert found.api_key == "sk-test", "the key comes from the environment"
    assert engine_settings("local") == EngineSettings(timeout_s=30.0)
    assert engine_settings("local").api_key is None
    (tmp_path / "v.toml").write_text('int8 = "qwen-7b-w8a8"\n')
    assert engine_settings("http://other/v1", tmp_path / "v.toml").variants == {
        "int8": Variant("qwen-7b-w8a8")
    }
    assert engine_settings("http://other/v1").variants is None, "another server's ids are its own"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('[engine]\nurl = "http://gpu/v1"\napi_key = "sk-1"\n', "remove 'api_key' from [engine]"),
        ('[engine]\nurl = "http://gpu/v1"\ntimeout_s = 0\n', "timeout_s must be a number of seconds above 0"),
        ('[engine]\nurl = ""\n', "url must be a non-empty string"),
        ("[engine]\nport = 8000\n", "[engine] has no setting 'port'"),
        ('[engine.variants]\nbf16 = "m"\n', "[engine.variants] names the variants of a url"),
        (
            '[engine]\nurl = "http://gpu/v1"\n[engine.variants]\nbf16 = 3\n',
            "[engine.variants]: each line must be",
        ),
        ("[engine\n", "cannot read the config file"),
        ("engine = 3\n", "[engine] must be a table"),
    ],
)
def test_a_wrong_config_file_is_named_with_what_is_wrong(home: Path, text: str, said: str) -> None:
    path = _config(text)
    with pytest.raises(RemoteError) as caught:
        engine_settings()
    assert str(path) in str(caught.value) and said in str(caught.value)
