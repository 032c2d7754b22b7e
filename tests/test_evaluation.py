"""`moa eval` and `moa bench` on the tiny model: configurations, aggregates and the report."""

from __future__ import annotations

import json

import pytest

from moa.benchmark import STAGES, markdown, run_bench
from moa.config import RouteSettings
from moa.evaluation import CONFIGS, EvalQuery, aggregate, load_queries, markdown_table, run_eval


def test_eval_runs_every_configuration(tiny_engine):
    queries = [EvalQuery("Translate 'dog' into German.", "Hund", ["german"]),
               EvalQuery("What is a violin?", "A bowed string instrument.", ["music"])]
    settings = RouteSettings(top_k=2, max_new_tokens=2, max_iterations=2, threshold=0.0)
    result = run_eval(tiny_engine, queries, settings, CONFIGS)
    assert set(result["configs"]) == set(CONFIGS) - {"topk_untrained"}  # no trained head is loaded
    for row in result["configs"].values():
        assert {"routing_acc@1", "routing_acc@3", "mean_nll", "oracle_gain_recovered"} <= set(row)
    oracle = result["configs"]["oracle"]["mean_nll"]
    assert all(row["mean_nll"] >= oracle - 1e-6 for name, row in result["configs"].items()
               if name in ("top1", "base"))
    assert result["configs"]["oracle"]["oracle_gain_recovered"] == pytest.approx(1.0)
    assert result["configs"]["base"]["oracle_gain_recovered"] == pytest.approx(0.0)
    assert result["configs"]["topk_refine"]["mean_iterations"] == 2
    assert len(result["queries"]) == 2
    assert "| topk |" in markdown_table(result["configs"])
    json.dumps(result)


def test_aggregate_gain_recovered():
    rows = [{"domains": ["a"], "results": {
        "base": {"nll": 4.0, "hit_at_1": None, "hit_at_3": None, "iterations": 1},
        "oracle": {"nll": 2.0, "hit_at_1": True, "hit_at_3": True, "iterations": 1},
        "topk": {"nll": 3.0, "hit_at_1": False, "hit_at_3": True, "iterations": 1}}}]
    summary = aggregate(rows, ["base", "oracle", "topk"])
    assert summary["topk"]["oracle_gain_recovered"] == pytest.approx(0.5)
    assert summary["topk"]["routing_acc@1"] == 0.0
    assert summary["topk"]["routing_acc@3"] == 1.0
    assert summary["base"]["routing_acc@1"] is None


def test_load_queries_accepts_corpus_lines(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text('{"query": "What is moss?", "reference": "A plant.", "domains": ["plants"]}\n'
                    '{"prompt": "Define tempo.", "response": "Speed.", "segment": "music"}\n')
    queries = load_queries(path)
    assert [q.domains for q in queries] == [["plants"], ["music"]]


def test_load_queries_rejects_missing_reference(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text('{"query": "What is moss?"}\n')
    with pytest.raises(ValueError, match=r"queries.jsonl:1: expected non-empty string fields"):
        load_queries(path)


def test_unknown_configuration_rejected(tiny_engine):
    with pytest.raises(ValueError, match="Unknown configuration"):
        run_eval(tiny_engine, [EvalQuery("q", "r")], RouteSettings(), ["best"])


def test_bench_needs_five_adapters(tiny_engine):
    with pytest.raises(ValueError, match="at least 5 registered adapters, found 3"):
        run_bench(tiny_engine, tiny_engine.config, repeats=1, stages=("routing",))


def test_bench_rejects_unknown_stage(tiny_engine):
    with pytest.raises(ValueError, match="Unknown bench stage"):
        run_bench(tiny_engine, tiny_engine.config, repeats=1, stages=("warp",))


def test_markdown_lists_goals_and_rows():
    from moa.benchmark import BenchResult, Goal

    result = BenchResult(rows={"encode query (ms)": 8.8}, goals=[Goal("cold start", "<= 10 s", "0.4 s", True)])
    text = markdown(result, "moa bench", "test machine", 3)
    assert "| cold start | <= 10 s | 0.4 s | yes |" in text
    assert "| encode query (ms) | 8.800 |" in text
    assert set(STAGES) == {"routing", "generation", "break_even", "scoring", "chroma", "cold_start"}
