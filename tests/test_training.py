"""Segmented fine-tuning on the tiny model: folder format, response-only loss, resume, segments."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_MODEL_ID, make_tiny_model, tiny_segment
from moa.adapters import read_adapter
from moa.corpus import Example
from moa.experts import RekeyError, kmeans_segments, label_segments, rekey_library
from moa.models import BaseModel, ModelSource
from moa.training import Segment, TrainingConfig, collate, encode_pair, expert_is_complete, expert_keys, train_expert


def fresh_base(tokenizer) -> BaseModel:
    return BaseModel(make_tiny_model(tokenizer), tokenizer, ModelSource(TINY_MODEL_ID, "memory"),
                     torch.device("cpu"), torch.float32)


def small_config(**changes) -> TrainingConfig:
    values = dict(rank=4, alpha=8.0, steps=4, batch_size=2, checkpoint_every=2, sample_queries=2,
                  learning_rate=5e-3, target_modules=("q_proj", "v_proj"))
    values.update(changes)
    return TrainingConfig(**values)


def test_loss_mask_covers_response_and_end_of_turn(tokenizer):
    ids, mask = encode_pair(tokenizer, "What is moss?", "A small plant.", max_length=200)
    response = tokenizer("A small plant.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert sum(mask) == len(response)
    assert [i for i, m in zip(ids, mask) if m] == response


def test_collate_masks_by_attention_not_pad_id(tokenizer):
    pairs = [encode_pair(tokenizer, "Hi", "Yes.", 64), encode_pair(tokenizer, "What is a long question?", "No.", 64)]
    batch = collate(pairs, tokenizer.pad_token_id)
    short = len(pairs[0][0])
    assert batch["attention_mask"][0, :short].all()
    assert not batch["attention_mask"][0, short:].any()
    # the end-of-turn token equals the pad token, and is still a scored target
    assert batch["input_ids"][0, short - 1] == tokenizer.pad_token_id
    assert batch["loss_mask"][0, short - 1] == 1


def test_expert_folder_is_standard_peft(tmp_path, tokenizer, encoder):
    base = fresh_base(tokenizer)
    result = train_expert(base, tiny_segment("music"), tmp_path / "adapters", tmp_path / "runs", small_config(), encoder)
    folder = result.folder
    assert expert_is_complete(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TINY_MODEL_ID
    assert config["r"] == 4
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    info = read_adapter(folder)
    assert info.domain == "music"
    assert info.keys.shape == (1, encoder.dim)  # one key: prompt centroid plus pair centroid
    assert info.sample_queries and len(info.sample_queries) == 2
    assert info.keys_encoder == encoder.encoder_id
    card = (folder / "README.md").read_text()
    assert "Validation NLL" in card
    assert "Licence of the data: CC0" in card
    assert len((folder / "loss_log.csv").read_text().splitlines()) == 4
    assert not any(name.startswith("lora") for name, _ in base.model.named_modules())  # LoRA layers removed


def test_expert_key_between_both_centroids(encoder):
    segment = tiny_segment("plants")
    key = expert_keys(segment, encoder)[0]
    prompts = torch.nn.functional.normalize(encoder.encode([e.prompt for e in segment.train]).mean(0), dim=0)
    pairs = torch.nn.functional.normalize(
        encoder.encode([f"{e.prompt} {e.response}" for e in segment.train]).mean(0), dim=0)
    assert torch.linalg.vector_norm(key).item() == pytest.approx(1.0, abs=1e-5)
    assert (key @ prompts).item() == pytest.approx((key @ pairs).item(), abs=1e-5)  # equal angle to both
    assert (key @ prompts).item() > (pairs @ prompts).item()  # strictly between them
    with pytest.raises(ValueError, match="no training examples"):
        expert_keys(Segment("empty", "plants", "", [], []), encoder)


def test_rekey_rewrites_only_the_keys(tmp_path, tokenizer, encoder):
    base = fresh_base(tokenizer)
    folder = train_expert(base, tiny_segment("music"), tmp_path / "adapters", tmp_path / "runs", small_config(),
                          encoder).folder
    expected = expert_keys(tiny_segment("music"), encoder)
    (folder / "keys.safetensors").write_bytes(b"")  # a stale key, as from an older design
    others = {path.name: path.read_bytes() for path in folder.iterdir() if path.name != "keys.safetensors"}
    rekey_library(encoder, [tiny_segment("music")], tmp_path / "adapters")
    assert torch.allclose(read_adapter(folder).keys, expected)
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.name != "keys.safetensors"} == others
    assert sorted(path.name for path in (tmp_path / "adapters").iterdir()) == ["music"]  # no staging left


def test_rekey_missing_expert_changes_nothing(tmp_path, tokenizer, encoder):
    base = fresh_base(tokenizer)
    folder = train_expert(base, tiny_segment("music"), tmp_path / "adapters", tmp_path / "runs", small_config(),
                          encoder).folder
    before = (folder / "keys.safetensors").read_bytes()
    (folder / "keys.safetensors").write_bytes(before[:-1] + bytes([before[-1] ^ 1]))
    changed = (folder / "keys.safetensors").read_bytes()
    with pytest.raises(FileNotFoundError, match="german.*No key was changed"):
        rekey_library(encoder, [tiny_segment("music"), tiny_segment("german")], tmp_path / "adapters")
    assert (folder / "keys.safetensors").read_bytes() == changed


def test_completed_expert_is_skipped(tmp_path, tokenizer, encoder):
    base = fresh_base(tokenizer)
    train_expert(base, tiny_segment("music"), tmp_path / "adapters", tmp_path / "runs", small_config(), encoder)
    again = train_expert(base, tiny_segment("music"), tmp_path / "adapters", tmp_path / "runs", small_config(), encoder)
    assert again.skipped


def test_resume_matches_uninterrupted_run(tmp_path, tokenizer, encoder):
    """A run stopped after its step-2 checkpoint and resumed ends with the same weights as one that never stopped."""
    reference = train_expert(fresh_base(tokenizer), tiny_segment("german"), tmp_path / "a", tmp_path / "runs-a",
                             small_config(), encoder)

    class Interrupt(Exception):
        pass

    import moa.training as training

    original = training._save_checkpoint

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise Interrupt()

    training._save_checkpoint = save_then_stop
    try:
        with pytest.raises(Interrupt):
            train_expert(fresh_base(tokenizer), tiny_segment("german"), tmp_path / "b", tmp_path / "runs-b",
                         small_config(), encoder)
    finally:
        training._save_checkpoint = original
    assert (tmp_path / "runs-b" / "german" / "checkpoint.pt").is_file()
    assert not (tmp_path / "b" / "german").exists()

    resumed = train_expert(fresh_base(tokenizer), tiny_segment("german"), tmp_path / "b", tmp_path / "runs-b",
                           small_config(), encoder)
    expected = load_file(str(reference.folder / "adapter_model.safetensors"))
    actual = load_file(str(resumed.folder / "adapter_model.safetensors"))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-3, atol=1e-4)
    assert len((resumed.folder / "loss_log.csv").read_text().splitlines()) == 4


def test_training_lowers_validation_nll(tmp_path, tokenizer, encoder):
    result = train_expert(fresh_base(tokenizer), tiny_segment("plants"), tmp_path / "adapters", tmp_path / "runs",
                          small_config(steps=12, learning_rate=1e-2), encoder)
    assert result.validation_nll_after < result.validation_nll_before


def test_training_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        TrainingConfig(steps=0)
    with pytest.raises(ValueError, match="target_modules"):
        TrainingConfig(target_modules=())


def labelled_splits():
    train = [Example(f"What is a {word}?", f"A {word}.", domain, term=word)
             for domain, words in {"plants": ["fern", "oak", "moss", "tulip"],
                                   "music": ["violin", "sonata", "drum", "flute"]}.items() for word in words]
    validation = [Example("What is a rose?", "A flower.", "plants", term="rose"),
                  Example("What is a cello?", "An instrument.", "music", term="cello")]
    return {"train": train, "validation": validation}


def test_label_segments_keep_order_and_describe(encoder):
    segments = label_segments(labelled_splits(), encoder, ["music", "plants"])
    assert [s.name for s in segments] == ["music", "plants"]
    assert len(segments[0].train) == 4
    assert [e.term for e in segments[1].validation] == ["rose"]
    assert segments[0].description.startswith("music: ")
    assert set(segments[0].top_terms) <= {"violin", "sonata", "drum", "flute"}


def test_label_segments_reject_unknown_label(encoder):
    with pytest.raises(ValueError, match=r"No examples labelled \['law'\]"):
        label_segments(labelled_splits(), encoder, ["law"])


def test_kmeans_segments_balanced(encoder):
    segments = kmeans_segments(labelled_splits(), 2, encoder)
    assert sorted(len(s.train) for s in segments) == [4, 4]
    assert all(s.name.startswith("cluster-") for s in segments)
    assert {s.domain for s in segments} <= {"plants", "music"}


def test_rekey_rejects_a_foreign_expert(tmp_path, tokenizer, encoder):
    base = fresh_base(tokenizer)
    folder = train_expert(base, tiny_segment("music"), tmp_path / "adapters", tmp_path / "runs", small_config(),
                          encoder).folder
    keys = (folder / "keys.safetensors").read_bytes()
    folder.rename(tmp_path / "adapters" / "german")  # the music expert where the german one should be
    with pytest.raises(RekeyError, match="not trained on this segment.*'name': 'music'"):
        rekey_library(encoder, [tiny_segment("german")], tmp_path / "adapters")
    assert (tmp_path / "adapters" / "german" / "keys.safetensors").read_bytes() == keys


def test_rekey_rejects_an_imported_folder(tmp_path, tokenizer, encoder):
    base = fresh_base(tokenizer)
    folder = train_expert(base, tiny_segment("music"), tmp_path / "adapters", tmp_path / "runs", small_config(),
                          encoder).folder
    (folder / "keys.safetensors").unlink()  # as `moa import` leaves a plain PEFT folder
    with pytest.raises(RekeyError, match="not a complete expert folder.*moa index"):
        rekey_library(encoder, [tiny_segment("music")], tmp_path / "adapters")
    assert not (folder / "keys.safetensors").exists()
