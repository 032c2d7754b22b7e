"""Key designs compared by routing accuracy and by cached teacher scores, on hand-made and tiny data."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_DOMAINS, copy_adapter
from moa.corpus import Example, write_jsonl
from moa.key_designs import DESIGNS, PROBES, best_key_scores, compare, rank_metrics, teacher_nll


def test_rank_metrics_match_a_hand_count():
    queries = torch.eye(3)
    keys = [torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.0]]), torch.tensor([[0.0, 0.9, 0.0]]),
            torch.tensor([[0.5, 0.0, 0.2]])]
    scores = best_key_scores(queries, keys)
    assert torch.equal(scores, torch.tensor([[1.0, 0.0, 0.5], [0.6, 0.9, 0.0], [0.0, 0.0, 0.2]]))
    metrics = rank_metrics(scores, torch.tensor([0, 0, 1]))  # ranks 1, 2 and 2 (a tie counts for the query)
    assert metrics["accuracy@1"] == pytest.approx(1 / 3)
    assert metrics["accuracy@3"] == 1.0
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)


def test_teacher_nll_reads_cached_scores(tmp_path):
    rows = [dict(query="q0", domain="a", embedding=torch.tensor([1.0, 0.0]), candidates=["a", "b"],
                 nll_alone=torch.tensor([1.0, 3.0])),
            dict(query="q1", domain="b", embedding=torch.tensor([0.0, 1.0]), candidates=["a", "b"],
                 nll_alone=torch.tensor([2.0, 4.0])),
            dict(query="q2", domain="b", embedding=torch.tensor([0.0, 1.0]), candidates=["a"],
                 nll_alone=torch.tensor([5.0]))]
    torch.save({"signature": {}, "examples": rows}, tmp_path / "teacher.pt")
    by_axis = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]  # q0 -> a, q1 and q2 -> b
    always_a = [torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, -1.0]])]
    report = teacher_nll(tmp_path / "teacher.pt", {"axis": by_axis, "always a": always_a}, ["a", "b"])
    assert report["queries"] == 3
    assert report["scored"] == 2  # q2's top-1 under "axis" is b, which is not a cached candidate
    assert report["designs"]["axis"]["accuracy@1"] == pytest.approx(1.0)
    assert report["designs"]["axis"]["top1_nll_alone"] == pytest.approx((1.0 + 4.0) / 2)
    assert report["designs"]["always a"]["accuracy@1"] == pytest.approx(1 / 3)
    assert report["designs"]["always a"]["top1_nll_alone"] == pytest.approx((1.0 + 2.0) / 2)


def write_corpus(folder, domains) -> None:
    examples = [Example(prompt, response, domain, term=prompt, source="tests")
                for domain in domains for prompt, response in TINY_DOMAINS[domain]]
    write_jsonl(folder / "train.jsonl", examples)
    write_jsonl(folder / "validation.jsonl", examples[:2])
    write_jsonl(folder / "test.jsonl", examples)


def test_compare_scores_every_design(tmp_path, tiny_library, encoder):
    domains = ("plants", "music", "german")
    write_corpus(tmp_path / "corpus", domains)
    report = compare(tmp_path / "corpus", tiny_library, encoder, domains)
    assert report["test_queries"] == sum(len(TINY_DOMAINS[domain]) for domain in domains)
    assert list(report["designs"]) == list(DESIGNS)
    for name, metrics in report["designs"].items():
        assert 0.0 <= metrics["accuracy@1"] <= metrics["accuracy@3"] <= 1.0, name
        assert set(metrics["probes"]) == {probe for probe, _ in PROBES}, name
        assert set(metrics["probes"].values()) <= set(domains), name


def test_compare_rejects_an_unknown_domain(tmp_path, tiny_library, encoder):
    write_corpus(tmp_path / "corpus", ("plants", "music"))
    copy_adapter(tiny_library / "plants", tmp_path / "library" / "plants")
    with pytest.raises(ValueError, match="No training pairs labelled chess"):
        compare(tmp_path / "corpus", tmp_path / "library", encoder, ("plants", "chess"))
