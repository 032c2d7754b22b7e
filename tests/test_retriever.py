"""Retriever training: teacher scores from the LM, the query head, the losses and the shipped head."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from moa import retriever_training
from moa.corpus import Example
from moa.retriever_training import (KeyTable, QueryHead, TeacherExample, TrainingSettings, load_query_head,
                                    report_markdown, routing_accuracy, save_curves, teacher_examples, teacher_targets,
                                    train_head, train_retriever)
from moa.weighting import leave_one_out_weights, relevance_weights

from conftest import TINY_DOMAINS

DIM = 16


def test_head_starts_as_identity():
    head = QueryHead(DIM)
    queries = F.normalize(torch.randn(5, DIM), dim=-1)
    assert torch.allclose(head.transform(queries), queries, atol=1e-6)


def test_head_save_and_load(tmp_path, encoder):
    head = QueryHead(encoder.dim, encoder.encoder_id, "pdist")
    torch.nn.init.normal_(head.linear.weight, std=0.01)
    head.null_score.data.fill_(0.3)
    head.save(tmp_path / "head.safetensors")
    loaded = load_query_head(tmp_path / "head.safetensors", encoder)
    assert loaded is not None
    assert loaded.variant == "pdist"
    assert torch.equal(loaded.linear.weight, head.linear.weight)
    assert loaded.null_score.item() == pytest.approx(0.3)


def test_head_for_other_encoder_ignored(tmp_path, encoder, caplog):
    QueryHead(encoder.dim, "some/other-encoder", "pdist").save(tmp_path / "head.safetensors")
    with caplog.at_level(logging.WARNING):
        assert load_query_head(tmp_path / "head.safetensors", encoder) is None
    assert "some/other-encoder" in caplog.text


def test_missing_head_means_none(tmp_path, encoder):
    assert load_query_head(tmp_path / "absent.safetensors", encoder) is None


def test_teacher_scores_match_separate_passes(tiny_engine):
    example = Example("Translate 'dog' into German.", "Hund", "german")
    scored = retriever_training.score_candidates(tiny_engine, example, candidates=3, temperature=0.1)
    assert len(scored.candidates) == 3
    assert scored.domain == "german"

    # each row of the batched pass against its own single-row pass
    similarities = torch.tensor([item.similarity for item in tiny_engine.retrieve(example.prompt, 3, use_trained=False)])
    rows = leave_one_out_weights(relevance_weights(similarities, "softmax", 0.1))
    for i, adapter_id in enumerate(scored.candidates):
        alone = tiny_engine.reference_nll(example.prompt, example.response, [{adapter_id: 1.0}])
        without = tiny_engine.reference_nll(example.prompt, example.response,
                                            [dict(zip(scored.candidates, rows[1 + i].tolist()))])
        assert scored.nll_alone[i].item() == pytest.approx(alone.item(), abs=1e-4)
        assert scored.nll_without[i].item() == pytest.approx(without.item(), abs=1e-4)
    base = tiny_engine.reference_nll(example.prompt, example.response, [{}])
    assert scored.nll_base == pytest.approx(base.item(), abs=1e-4)
    assert scored.tokens >= 1


def test_teacher_cache_resumes(tiny_engine, tmp_path, monkeypatch):
    examples = [Example(prompt, response, domain) for domain, pairs in TINY_DOMAINS.items() for prompt, response in pairs]
    cache = tmp_path / "teacher.pt"
    first = teacher_examples(tiny_engine, examples[:3], 3, cache=cache, save_every=2)
    assert cache.is_file()

    scored_now = []
    original = retriever_training.score_candidates

    def counting(engine, example, candidates, temperature):
        scored_now.append(example.prompt)
        return original(engine, example, candidates, temperature)

    monkeypatch.setattr(retriever_training, "score_candidates", counting)
    second = teacher_examples(tiny_engine, examples[:5], 3, cache=cache)
    assert scored_now == [examples[3].prompt, examples[4].prompt]
    assert torch.equal(second[0].nll_alone, first[0].nll_alone)

    scored_now.clear()
    teacher_examples(tiny_engine, examples[:2], 3, temperature=0.5, cache=cache)
    assert len(scored_now) == 2  # another weighting temperature invalidates the cache


def _example(query: torch.Tensor, domain: str, candidates: list[str], nll_alone: list[float]) -> TeacherExample:
    alone = torch.tensor(nll_alone)
    return TeacherExample(query="q", domain=domain, embedding=query, candidates=candidates, nll_alone=alone,
                          nll_without=alone.mean() + 0.5 * (alone.mean() - alone), nll_full=float(alone.mean()),
                          nll_base=float(alone.max() + 1.0), tokens=4)


def test_teacher_targets_rank_the_best_adapter_first():
    example = _example(torch.zeros(DIM), "b", ["a", "b", "c"], [3.0, 1.0, 2.0])
    for variant in ("pdist", "loop", "emdr"):
        targets = teacher_targets([example], variant)[0]
        assert targets.shape == (4,), variant
        assert targets[:3].argmax().item() == 1, variant
    with pytest.raises(ValueError, match="No teacher target for variant 'supervised'"):
        teacher_targets([example], "supervised")


def _permuted_task(seed: int = 0, per_adapter: int = 24):
    """Queries that sit next to adapter i's key while the LM prefers adapter (i + 1) mod 4."""
    generator = torch.Generator().manual_seed(seed)
    names = ["a", "b", "c", "d"]
    keys = F.normalize(torch.randn(4, DIM, generator=generator), dim=-1)
    table = KeyTable(names, keys, torch.arange(4))
    domain_of = {name: f"domain-{name}" for name in names}
    examples = []
    for i in range(4):
        for _ in range(per_adapter):
            query = F.normalize(keys[i] + 0.3 * torch.randn(DIM, generator=generator) / DIM ** 0.5, dim=-1)
            preferred = (i + 1) % 4
            nll = [1.0 if j == preferred else 3.0 for j in range(4)]
            examples.append(_example(query, f"domain-{names[preferred]}", names, nll))
    return table, domain_of, examples


@pytest.mark.parametrize("variant", ["pdist", "loop", "emdr", "supervised"])
def test_head_learns_the_teacher_preference(variant):
    table, domain_of, examples = _permuted_task()
    validation, training = examples[::6], [e for i, e in enumerate(examples) if i % 6]
    assert routing_accuracy(None, table, validation, domain_of)["acc@1"] == 0.0

    # EMDR² only moves mass towards candidates the retriever already gives some probability, so at
    # T_s = 0.01 a confidently wrong retriever never finds the preferred adapter; 0.1 lets it.
    temperature = 0.1 if variant == "emdr" else 0.01
    settings = TrainingSettings(variant=variant, epochs=60, learning_rate=1e-2, retriever_temperature=temperature)
    head, curve = train_head(training, table, domain_of, "test-encoder", settings, validation)
    assert routing_accuracy(head, table, validation, domain_of)["acc@1"] >= 0.9
    assert curve.loss[-1] < curve.loss[0]
    assert len(curve.validation_accuracy) == 60
    assert curve.best_epoch == 1 + curve.validation_loss.index(min(curve.validation_loss))


def test_low_rank_head_saves_dense_map(tmp_path, encoder):
    head = QueryHead(encoder.dim, encoder.encoder_id, "loop", rank=4)
    torch.nn.init.normal_(head.up.weight, std=0.1)
    queries = F.normalize(torch.randn(3, encoder.dim), dim=-1)
    head.save(tmp_path / "head.safetensors")
    loaded = load_query_head(tmp_path / "head.safetensors", encoder)
    assert torch.allclose(loaded.transform(queries), head.transform(queries), atol=1e-6)
    with pytest.raises(ValueError, match="rank must be between 0"):
        QueryHead(encoder.dim, rank=encoder.dim + 1)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="variant must be one of"):
        TrainingSettings(variant="contrastive")
    with pytest.raises(ValueError, match="teacher_temperature"):
        TrainingSettings(teacher_temperature=0.0)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        TrainingSettings(rank=-1)


def test_key_table_takes_best_key_per_adapter():
    keys = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), dim=-1)
    table = KeyTable(["x", "y"], keys, torch.tensor([0, 1, 1]))
    similarities = table.similarities(torch.tensor([[1.0, 0.0], [0.8, 0.6]]))
    assert torch.allclose(similarities, torch.tensor([[1.0, 0.6], [0.8, 0.96]]))


def test_train_retriever_end_to_end(tiny_engine, tmp_path):
    examples = [Example(prompt, response, domain) for domain, pairs in TINY_DOMAINS.items() for prompt, response in pairs]
    settings = TrainingSettings(epochs=3, rank=4)
    result = train_retriever(tiny_engine, examples[::2], examples[1::2][:3], examples[1::2][3:], candidates=3,
                             settings=settings, retriever_temperatures=(0.01, 0.05), cache=tmp_path / "teacher.pt",
                             routing_test=examples)
    assert set(result.heads) == {"untrained", "pdist", "loop", "emdr", "supervised"}
    assert result.chosen in {"pdist", "loop", "emdr"}
    for name, report in result.reports.items():
        assert 0.0 <= report.routing["acc@1"] <= 1.0, name
        assert report.merged_nll > 0, name
    report = result.to_json()
    assert report["test_queries"] == 3
    assert report["validation_queries"] == 3
    # three LM variants at two temperatures, the supervised baseline once, and the untrained encoder
    assert len(report["grid"]) == 3 * 2 + 1 + 1
    assert report["routing_only"]["untrained"]["queries"] == len(examples)
    assert set(report["curves"]) == {"pdist", "loop", "emdr", "supervised"}
    table = report_markdown(report)
    assert f"| {result.chosen} (shipped) |" in table
    assert "| supervised |" in table
    save_curves(result.curves, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_train_retriever_rejects_too_many_candidates(tiny_engine):
    with pytest.raises(ValueError, match="candidates=8 is more than the 3 registered adapters"):
        train_retriever(tiny_engine, [Example("q", "r", "music")], [Example("q", "r", "music")],
                        [Example("q", "r", "music")], candidates=8)


def test_engine_routes_through_trained_head(tiny_engine, tmp_path):
    query = "What is a violin?"
    untrained = [item.adapter_id for item in tiny_engine.retrieve(query, 3, use_trained=False)]
    target = untrained[-1]

    # a head that maps every query onto the last-ranked adapter's best key
    owners, vectors = tiny_engine.store.keys()
    key = F.normalize(vectors[owners.index(target)], dim=-1)
    head = QueryHead(tiny_engine.encoder.dim, tiny_engine.encoder.encoder_id, "pdist")
    head.linear.weight.data = -torch.eye(tiny_engine.encoder.dim)
    head.linear.bias.data = key
    head.save(tmp_path / "head.safetensors")

    tiny_engine.config.retriever_head = tmp_path / "head.safetensors"
    tiny_engine.load_default_query_head()
    assert tiny_engine.query_head is not None
    assert tiny_engine.retrieve(query, 3)[0].adapter_id == target
    assert [item.adapter_id for item in tiny_engine.retrieve(query, 3, use_trained=False)] == untrained
