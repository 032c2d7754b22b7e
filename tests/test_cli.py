"""The `moa` command line: exit codes, messages, and index/list/remove against a local store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import SHARED_MODEL_CACHE
from moa.cli import build_parser, main


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MOA_MODEL_CACHE", str(SHARED_MODEL_CACHE))
    monkeypatch.setenv("MOA_ADAPTERS", str(tmp_path / "no-library"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("command", ["query", "index", "import", "list", "remove", "build-corpus", "train-experts",
                                     "library-report", "train-retriever", "bench-scale"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: moa" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["query", "What is moss?", "--top-k", "0"], "top_k must be an integer in [1, 64], got 0"),
    (["query", "What is moss?", "--threshold", "-1"], "threshold must be >= 0"),
    (["query", "What is moss?", "--temperature", "0"], "temperature must be > 0"),
    (["train-experts", "--corpus", "missing-corpus"], "lacks train.jsonl"),
    (["train-retriever", "--candidates", "4"], "--candidates must be at least 8, got 4"),
    (["query", "   "], "The query is empty"),
])
def test_bad_input_exits_2_with_one_line(cli_env, capsys, argv, message):
    assert main(argv) == 2
    output = capsys.readouterr()
    error = output.err.strip()
    assert message in error
    assert len(error.splitlines()) == 1
    assert output.out == ""


def test_unknown_option_exits_2(cli_env):
    with pytest.raises(SystemExit) as exit_info:
        main(["query", "x", "--no-such-option"])
    assert exit_info.value.code == 2


def test_list_empty_store(cli_env, capsys):
    assert main(["list"]) == 0
    assert "No adapters registered" in capsys.readouterr().out


def test_remove_unknown_adapter(cli_env, capsys):
    assert main(["remove", "ghost"]) == 2
    assert "Not registered: ghost" in capsys.readouterr().err


@pytest.mark.slow
def test_index_list_remove_round_trip(cli_env, tmp_path, capsys):
    """Index shipped-format adapters with the real default model, then list and remove them."""
    from pathlib import Path

    library = Path(__file__).resolve().parent.parent / "adapters"
    if not any(library.glob("*/adapter_config.json")):
        pytest.skip("adapters/ holds no adapters yet")
    assert main(["index", str(library)]) == 0
    first = capsys.readouterr().out
    assert first.startswith("added ")
    assert main(["index", str(library)]) == 0
    assert "added 0, updated 0, removed 0" in capsys.readouterr().out
    assert main(["list", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    victim = records[0]["adapter_id"]
    assert main(["remove", victim]) == 0
    assert f"removed {victim}" in capsys.readouterr().out
    assert main(["list", "--json"]) == 0
    assert victim not in {r["adapter_id"] for r in json.loads(capsys.readouterr().out)}


def test_module_entry_point_runs(cli_env):
    result = subprocess.run([sys.executable, "-m", "moa.cli", "list"], capture_output=True, text=True,
                            env={**os.environ}, timeout=120)
    assert result.returncode == 0, result.stderr


def test_library_report_rejects_unknown_domain(cli_env, capsys):
    corpus = cli_env / "corpus"
    corpus.mkdir()
    line = json.dumps({"prompt": "What is moss?", "response": "A small plant.", "segment": "plants", "term": "moss"})
    for split in ("train", "validation", "test"):
        (corpus / f"{split}.jsonl").write_text(line + "\n")
    assert main(["library-report", "--corpus", str(corpus), "--domains", "plants", "astrology"]) == 2
    error = capsys.readouterr().err
    assert "--domains: astrology not in the corpus; it has plants." in error


def write_tiny_corpus(folder, domain: str) -> None:
    from moa.corpus import Example, write_jsonl
    from conftest import TINY_DOMAINS

    examples = [Example(prompt, response, domain, term=prompt, source="tests") for prompt, response in TINY_DOMAINS[domain]]
    write_jsonl(folder / "train.jsonl", examples)
    write_jsonl(folder / "validation.jsonl", examples[:2])


def test_keys_only_needs_trained_experts(cli_env, tmp_path, capsys):
    write_tiny_corpus(tmp_path / "corpus", "music")
    argv = ["train-experts", "--keys-only", "--corpus", str(tmp_path / "corpus"), "--domains", "music",
            "--out", str(tmp_path / "empty")]
    assert main(argv) == 2
    assert "No trained expert for music" in capsys.readouterr().err


def test_keys_only_rewrites_the_key(cli_env, tmp_path, tiny_library, encoder, capsys, monkeypatch):
    from conftest import copy_adapter, tiny_segment
    from moa.adapters import read_adapter
    from moa.training import expert_keys

    library = tmp_path / "library"
    copy_adapter(tiny_library / "music", library / "music")
    write_tiny_corpus(tmp_path / "corpus", "music")
    (library / "music" / "keys.safetensors").write_bytes(b"stale")
    weights = (library / "music" / "adapter_model.safetensors").read_bytes()
    argv = ["train-experts", "--keys-only", "--corpus", str(tmp_path / "corpus"), "--domains", "music",
            "--out", str(library)]
    def no_base_model(*args, **kwargs):
        raise AssertionError("--keys-only loaded the base model")

    monkeypatch.setattr("moa.models.load_base_model", no_base_model)
    assert main(argv) == 0
    output = capsys.readouterr().out
    assert "music" in output
    assert "moa index" in output
    assert torch.allclose(read_adapter(library / "music").keys, expert_keys(tiny_segment("music"), encoder), atol=1e-6)
    assert (library / "music" / "adapter_model.safetensors").read_bytes() == weights
