"""The loop on the tiny model: per-token errors, leave-one-out, threshold, iterations and the trace."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.nn.functional as F

from moa.config import RouteSettings
from moa.contribution import compute_contributions
from moa.engine import QueryError
from moa.generation import answer_ids, chat_prompt_ids, generate
from moa.refinement import STRATEGIES, RetrievalPlan


def plain_token_nll(model, prompt_ids, target_ids):
    """Reference: one forward pass over prompt + target and cross-entropy on the target positions."""
    ids = torch.cat([prompt_ids, target_ids]).unsqueeze(0)
    logits = model(input_ids=ids).logits[0, prompt_ids.shape[0] - 1:-1]
    return F.cross_entropy(logits, target_ids, reduction="none")


def test_reference_nll_matches_plain_forward(tiny_engine):
    settings = RouteSettings(max_new_tokens=4, max_iterations=1, top_k=1)
    trace = tiny_engine.route("What is a fern?", settings, reference="A flowerless plant.")
    iteration = trace.iterations[0]
    assert iteration.error_metric == "nll"

    tokenizer = tiny_engine.base.tokenizer
    prompt_ids = chat_prompt_ids(tokenizer, "What is a fern?")
    target_ids = answer_ids(tokenizer, "A flowerless plant.")
    adapters = tiny_engine.load_weights([tiny_engine.store.adapters()[iteration.adapters[0].id]])
    with tiny_engine.mixer.unmerged(adapters, torch.ones(1)):
        expected = plain_token_nll(tiny_engine.base.model, prompt_ids, target_ids)
    assert [t.token_id for t in iteration.tokens] == target_ids.tolist()
    assert iteration.tokens[-1].token_id == tokenizer.eos_token_id  # the end-of-turn token is scored
    torch.testing.assert_close(torch.tensor([t.error for t in iteration.tokens]), expected, rtol=1e-4, atol=1e-4)


def test_generation_surprisal_matches_teacher_forcing(tiny_base):
    tokenizer = tiny_base.tokenizer
    prompt_ids = chat_prompt_ids(tokenizer, "Hello")
    generation = generate(tiny_base.model, tokenizer, prompt_ids, max_new_tokens=6)
    expected = plain_token_nll(tiny_base.model, prompt_ids, generation.token_ids)
    torch.testing.assert_close(generation.surprisal, expected, rtol=1e-4, atol=1e-4)
    assert len(generation.token_texts) == generation.token_ids.shape[0]


def test_streaming_callback_receives_answer(tiny_base):
    pieces = []
    generation = generate(tiny_base.model, tiny_base.tokenizer, chat_prompt_ids(tiny_base.tokenizer, "Hi"),
                          max_new_tokens=5, on_token=pieces.append)
    assert "".join(pieces).strip() == generation.text


def test_stop_event_ends_generation(tiny_base):
    stop = threading.Event()
    stop.set()
    generation = generate(tiny_base.model, tiny_base.tokenizer, chat_prompt_ids(tiny_base.tokenizer, "Hi"),
                          max_new_tokens=50, stop_event=stop)
    assert generation.token_ids.shape[0] == 1
    assert generation.stopped_by_user


@pytest.mark.parametrize("merge_method", ["exact", "cat", "svd"])
def test_batched_leave_one_out_matches_rerun(tiny_engine, merge_method):
    """The one-pass contributions equal scoring every mix separately."""
    records = list(tiny_engine.store.adapters().values())
    adapters = tiny_engine.load_weights(records)
    weights = torch.tensor([0.5, 0.3, 0.2])
    tokenizer = tiny_engine.base.tokenizer
    prompt_ids = chat_prompt_ids(tokenizer, "What is a violin?")
    target_ids = answer_ids(tokenizer, "A bowed string instrument.")
    model, mixer = tiny_engine.base.model, tiny_engine.mixer
    result = compute_contributions(model, mixer, adapters, weights, prompt_ids, target_ids, "nll", merge_method)

    def rerun(kept_weights: list[float]) -> torch.Tensor:
        from moa.merging import combine

        kept = [(a, w) for a, w in zip(adapters, kept_weights) if w != 0]
        if merge_method == "exact":
            components, mix = [a for a, _ in kept], torch.tensor([w for _, w in kept])
        else:
            components, mix = [combine([a for a, _ in kept], [w for _, w in kept], merge_method)], torch.ones(1)
        with mixer.unmerged(components, mix):
            return plain_token_nll(model, prompt_ids, target_ids)

    torch.testing.assert_close(result.full, rerun([0.5, 0.3, 0.2]), rtol=1e-4, atol=1e-4)
    for i in range(3):
        without = [0.0 if j == i else float(w) for j, w in enumerate(weights)]
        total = sum(without)
        torch.testing.assert_close(result.without[i], rerun([w / total for w in without]), rtol=1e-4, atol=1e-4)
        alone = [1.0 if j == i else 0.0 for j in range(3)]
        torch.testing.assert_close(result.alone[i], rerun(alone), rtol=1e-4, atol=1e-4)
    with mixer.unmerged([], torch.zeros(1, 0)):
        torch.testing.assert_close(result.base, plain_token_nll(model, prompt_ids, target_ids), rtol=1e-4, atol=1e-4)


def test_loop_accepts_below_threshold(tiny_engine):
    trace = tiny_engine.route("What is a violin?", RouteSettings(max_new_tokens=3, threshold=1000.0))
    assert len(trace.iterations) == 1
    assert trace.stopped_because == "below_threshold"
    assert trace.iterations[0].decision == "accept"


def test_loop_stops_at_max_iterations(tiny_engine):
    settings = RouteSettings(max_new_tokens=3, threshold=0.0, max_iterations=3, top_k=1, strategy="widen")
    trace = tiny_engine.route("What is a violin?", settings)
    assert len(trace.iterations) == 3
    assert trace.stopped_because == "max_iterations"
    assert [it.decision for it in trace.iterations] == ["refine", "refine", "stop"]
    assert [len(it.adapters) for it in trace.iterations] == [1, 3, 3]
    assert trace.final_iteration == min(range(3), key=lambda i: trace.iterations[i].mean_error)
    assert trace.final_answer == trace.iterations[trace.final_iteration].answer


def test_json_trace_has_documented_fields(tiny_engine):
    trace = tiny_engine.route("Translate 'tree' into German.", RouteSettings(max_new_tokens=3, threshold=0.0,
                                                                             max_iterations=2))
    data = json.loads(json.dumps(trace.to_dict()))
    for field in ("query", "final_answer", "stopped_because", "iterations"):
        assert field in data
    iteration = data["iterations"][0]
    for field in ("adapters", "tokens", "mean_error", "decision"):
        assert field in iteration
    for field in ("id", "domain", "similarity", "weight", "contribution"):
        assert field in iteration["adapters"][0]
    assert set(iteration["tokens"][0]) >= {"text", "error"}
    assert iteration["adapters"][0]["id"] == "german"


def test_min_similarity_falls_back_to_base(tiny_engine):
    trace = tiny_engine.route("What is a violin?", RouteSettings(max_new_tokens=3, min_similarity=0.99,
                                                                 max_iterations=1))
    iteration = trace.iterations[0]
    assert iteration.adapters == []
    assert "base model answers alone" in iteration.reason


def test_custom_strategy_callable(tiny_engine):
    seen = []

    def only_german(context):
        seen.append(context.last.mean_error)
        return RetrievalPlan(context.query, 1, fixed_weights={"german": 1.0}, note="custom")

    trace = tiny_engine.route("What is a violin?", RouteSettings(max_new_tokens=3, threshold=0.0, max_iterations=2),
                              strategy=only_german)
    assert len(seen) == 1
    assert [a.id for a in trace.iterations[1].adapters] == ["german"]
    assert trace.iterations[1].reason.startswith("custom")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs(tiny_engine, name):
    settings = RouteSettings(max_new_tokens=3, threshold=0.0, max_iterations=3, top_k=1, strategy=name)
    trace = tiny_engine.route("What is moss?", settings)
    assert len(trace.iterations) == 3


def test_reweight_moves_weight_to_helpful_adapter(tiny_engine):
    settings = RouteSettings(max_new_tokens=3, threshold=0.0, max_iterations=2, top_k=3, strategy="reweight",
                             weighting="uniform")
    trace = tiny_engine.route("What is a fern?", settings, reference="A flowerless plant with fronds.")
    first, second = trace.iterations
    by_id = {a.id: a for a in first.adapters}
    best = max(by_id.values(), key=lambda a: a.contribution)
    reweighted = {a.id: a.weight for a in second.adapters}
    assert reweighted[best.id] > by_id[best.id].weight


@pytest.mark.parametrize(("query", "message"), [
    ("", "empty"),
    ("   \n\t ", "empty"),
    ("\x00\x01\x02", "empty"),
    ("x" * 5000, "5000 characters"),
])
def test_bad_queries_rejected(tiny_engine, query, message):
    with pytest.raises(QueryError, match=message):
        tiny_engine.route(query, RouteSettings(max_new_tokens=2))


def test_control_characters_stripped(tiny_engine):
    trace = tiny_engine.route("What\x07 is moss?", RouteSettings(max_new_tokens=2, max_iterations=1))
    assert trace.query == "What is moss?"


def test_nll_metric_requires_reference(tiny_engine):
    with pytest.raises(QueryError, match="needs a reference"):
        tiny_engine.route("What is moss?", RouteSettings(max_new_tokens=2, error_metric="nll"))


def test_new_token_limit_enforced(tiny_engine):
    with pytest.raises(QueryError, match="allows at most"):
        tiny_engine.route("What is moss?", RouteSettings(max_new_tokens=4000))


def test_base_weights_unchanged_after_route(tiny_engine):
    before = {name: t.clone() for name, t in tiny_engine.base.model.state_dict().items()}
    tiny_engine.route("What is moss?", RouteSettings(max_new_tokens=20, execution_path="merged", max_iterations=2,
                                                     threshold=0.0))
    for name, tensor in tiny_engine.base.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_execution_paths_give_same_answer(tiny_engine):
    answers = {path: tiny_engine.route("What is a chord?", RouteSettings(max_new_tokens=8, execution_path=path,
                                                                         max_iterations=1)).final_answer
               for path in ("merged", "unmerged")}
    assert answers["merged"] == answers["unmerged"]
