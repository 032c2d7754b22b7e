"""Refinement strategies: what to retrieve next when an answer's error is above the threshold.

A strategy is a plain callable `(RefinementContext) -> RetrievalPlan`. Register your own in
`STRATEGIES` (or pass the callable to `MoA.route`) to try another policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import RouteSettings
from .trace import Iteration

MAX_TOP_K = 16
WIDEN_STEP = 2
REWEIGHT_TEMPERATURE = 0.25
"""Nats of contribution that change an adapter's weight by a factor e in `reweight`."""


@dataclass
class RetrievalPlan:
    """Retrieval request of the next iteration: a query and top-k, or a fixed mix."""

    query_text: str
    top_k: int
    fixed_weights: dict[str, float] | None = None
    """Adapter id -> weight; when set, the iteration skips retrieval and uses exactly this mix."""
    exclude: set[str] = field(default_factory=set)
    note: str = ""


@dataclass
class RefinementContext:
    """Inputs of a strategy: the query, the settings, and every iteration so far."""

    query: str
    settings: RouteSettings
    iterations: list[Iteration]
    plan: RetrievalPlan
    num_adapters: int

    @property
    def last(self) -> Iteration:
        return self.iterations[-1]


Strategy = Callable[[RefinementContext], RetrievalPlan]


def widen(context: RefinementContext) -> RetrievalPlan:
    """Retrieve more adapters for the same query text."""
    top_k = min(context.plan.top_k + WIDEN_STEP, context.num_adapters, MAX_TOP_K)
    return RetrievalPlan(context.plan.query_text, top_k, exclude=set(context.plan.exclude),
                         note=f"widen: top_k {context.plan.top_k} -> {top_k}")


def reweight(context: RefinementContext) -> RetrievalPlan:
    """Keep the adapters; scale each weight by exp(contribution / T) and renormalise.

    An adapter whose removal raised the error (positive contribution) gains weight; one whose
    removal lowered it loses weight.
    """
    adapters = context.last.adapters
    if not adapters or any(adapter.contribution is None for adapter in adapters):
        return widen(context)
    scores = {a.id: a.weight * math.exp(max(-20.0, min(20.0, a.contribution / REWEIGHT_TEMPERATURE)))
              for a in adapters}
    total = sum(scores.values())
    weights = {adapter_id: score / total for adapter_id, score in scores.items()}
    return RetrievalPlan(context.plan.query_text, len(weights), fixed_weights=weights,
                         exclude=set(context.plan.exclude), note="reweight by error contribution")


def drop(context: RefinementContext) -> RetrievalPlan:
    """Exclude adapters whose removal lowered the error, then retrieve the same number again."""
    harmful = {a.id for a in context.last.adapters if a.contribution is not None and a.contribution < 0}
    if not harmful:
        return widen(context)
    exclude = set(context.plan.exclude) | harmful
    return RetrievalPlan(context.plan.query_text, context.plan.top_k, exclude=exclude,
                         note=f"drop {', '.join(sorted(harmful))}")


def requery(context: RefinementContext) -> RetrievalPlan:
    """Retrieve again with the query followed by the draft answer, which names the topic more fully."""
    text = f"{context.query}\n{context.last.answer}".strip()
    return RetrievalPlan(text, context.plan.top_k, exclude=set(context.plan.exclude), note="re-query with the draft answer")


def chain(context: RefinementContext) -> RetrievalPlan:
    """Widen, then reweight, then re-query, cycling in that order."""
    steps: list[Strategy] = [widen, reweight, requery]
    return steps[(len(context.iterations) - 1) % len(steps)](context)


STRATEGIES: dict[str, Strategy] = {
    "widen": widen,
    "reweight": reweight,
    "drop": drop,
    "requery": requery,
    "chain": chain,
}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"Unknown refinement strategy {name!r}; choose one of {', '.join(STRATEGIES)}.") from None
