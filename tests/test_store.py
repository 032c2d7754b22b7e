"""The Chroma adapter store and `moa index`: round trip, idempotence, rejection without side effects."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_MODEL_ID, copy_adapter, edit_json
from moa.adapters import InvalidAdapterError
from moa.indexing import IndexingError, index_folder, register_folder
from moa.models import shapes_of_linear_modules
from moa.store import AdapterStore, collection_name


@pytest.fixture
def store(tmp_path, encoder) -> AdapterStore:
    return AdapterStore.open(TINY_MODEL_ID, encoder.encoder_id, tmp_path / "store")


@pytest.fixture
def shapes(tiny_base):
    return shapes_of_linear_modules(tiny_base.model)


@pytest.fixture
def library(tmp_path, tiny_library):
    folder = tmp_path / "library"
    for name in ("plants", "music", "german"):
        copy_adapter(tiny_library / name, folder / name)
    return folder


def snapshot(store: AdapterStore) -> dict:
    result = store.collection.get(include=["embeddings", "metadatas"])
    return {"ids": sorted(result["ids"]), "metadatas": sorted(json.dumps(m, sort_keys=True) for m in result["metadatas"])}


def test_index_round_trip(store, encoder, shapes, library):
    report = index_folder(library, store, encoder, shapes)
    assert sorted(report.added) == ["german", "music", "plants"]
    records = store.adapters()
    assert records["music"].domain == "music"
    assert records["music"].rank == 8
    assert records["plants"].target_modules == ["o_proj", "q_proj", "v_proj"]
    assert records["german"].base_model == TINY_MODEL_ID
    assert records["german"].num_keys == 1  # a trained expert has one key


def test_index_twice_changes_nothing(store, encoder, shapes, library):
    index_folder(library, store, encoder, shapes)
    before = snapshot(store)
    report = index_folder(library, store, encoder, shapes)
    assert report.added == report.updated == report.removed == []
    assert sorted(report.unchanged) == ["german", "music", "plants"]
    assert snapshot(store) == before


def test_index_updates_changed_and_removes_deleted(store, encoder, shapes, library):
    index_folder(library, store, encoder, shapes)
    edit_json(library / "music" / "moa.json", description="Questions about orchestras")
    import shutil

    shutil.rmtree(library / "plants")
    report = index_folder(library, store, encoder, shapes)
    assert report.updated == ["music"]
    assert report.removed == ["plants"]
    assert set(store.adapters()) == {"music", "german"}
    assert store.adapters()["music"].description == "Questions about orchestras"


def test_key_own_vector_has_relevance_one(store, encoder, shapes, library):
    index_folder(library, store, encoder, shapes)
    ids, vectors = store.keys()
    for adapter_id, vector in zip(ids, vectors):
        best = store.query(vector, top_k=1)[0]
        assert best.adapter_id == adapter_id
        assert best.similarity == pytest.approx(1.0, abs=1e-4)


def test_query_returns_adapters_not_records(store, encoder, shapes, library):
    index_folder(library, store, encoder, shapes)
    results = store.query(encoder.encode("Translate 'cat' into German.")[0], top_k=3)
    assert [r.adapter_id for r in results][0] == "german"
    assert len({r.adapter_id for r in results}) == 3
    assert all(-1.0 <= r.similarity <= 1.0 for r in results)
    assert results == sorted(results, key=lambda r: -r.similarity)


def test_collection_per_model_and_encoder():
    assert collection_name("a", "enc") != collection_name("b", "enc")
    assert collection_name("a", "enc") != collection_name("a", "other")


def test_list_metadata_serialised(store, encoder, shapes, library):
    register_folder(library / "music", store, encoder, shapes)
    raw = store.collection.get(include=["metadatas"])["metadatas"][0]
    assert isinstance(raw["target_modules"], str)
    assert store.adapters()["music"].target_modules == ["o_proj", "q_proj", "v_proj"]


def _break_base_model(folder):
    edit_json(folder / "adapter_config.json", base_model_name_or_path="meta-llama/Llama-3-8B")


def _break_config_json(folder):
    (folder / "adapter_config.json").write_text("{not json")


def _remove_config(folder):
    (folder / "adapter_config.json").unlink()


def _corrupt_weights(folder):
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage")


def _nan_weights(folder):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def _wrong_shape(folder):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3, dtype=tensors[key].dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def _dora(folder):
    edit_json(folder / "adapter_config.json", use_dora=True)


def _not_lora(folder):
    edit_json(folder / "adapter_config.json", peft_type="IA3")


@pytest.mark.parametrize(("breaker", "reason"), [
    (_break_base_model, "trained for base model 'meta-llama/Llama-3-8B'"),
    (_break_config_json, "not valid JSON"),
    (_remove_config, None),
    (_corrupt_weights, "corrupt or unreadable"),
    (_nan_weights, "NaN or infinite"),
    (_wrong_shape, "do not fit the base model"),
    (_dora, "DoRA"),
    (_not_lora, "only LoRA adapters"),
])
def test_rejected_adapter_leaves_store_unchanged(store, encoder, shapes, library, tmp_path, breaker, reason):
    index_folder(library, store, encoder, shapes)
    before = snapshot(store)
    bad = copy_adapter(library / "music", library / "music-bad")
    breaker(bad)
    if reason is None:  # a folder without adapter_config.json is not an adapter folder at all
        report = index_folder(library, store, encoder, shapes)
        assert "music-bad" not in report.added
        assert snapshot(store) == before
        return
    with pytest.raises(IndexingError, match="music-bad") as error:
        index_folder(library, store, encoder, shapes)
    assert reason in str(error.value)
    assert "the store was not changed" in str(error.value)
    assert snapshot(store) == before
    with pytest.raises(InvalidAdapterError, match=f"Adapter 'music-bad' rejected: .*{reason.split(chr(39))[0]}"):
        register_folder(bad, store, encoder, shapes)
    assert snapshot(store) == before


def test_skip_invalid_registers_the_rest(store, encoder, shapes, library):
    _dora(copy_adapter(library / "music", library / "music-dora"))
    report = index_folder(library, store, encoder, shapes, skip_invalid=True)
    assert sorted(report.added) == ["german", "music", "plants"]


def test_remove_unknown_id_deletes_nothing(store, encoder, shapes, library):
    index_folder(library, store, encoder, shapes)
    before = snapshot(store)
    with pytest.raises(KeyError, match="Not registered: nope"):
        store.remove(["music", "nope"])
    assert snapshot(store) == before
    store.remove(["music"])
    assert set(store.adapters()) == {"german", "plants"}


def test_large_add_is_split_into_batches(store, encoder, shapes, library, monkeypatch):
    monkeypatch.setattr(store.client, "get_max_batch_size", lambda: 2)
    add = store.collection.add
    sizes = []

    def add_and_count(*args, **kwargs):
        sizes.append(len(kwargs["ids"]))
        return add(*args, **kwargs)

    monkeypatch.setattr(store.collection, "add", add_and_count)
    index_folder(library, store, encoder, shapes)
    assert sizes == [2, 1]  # three adapters of one key each
    assert store.collection.count() == 3
