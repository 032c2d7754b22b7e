"""The record of one routed query: every iteration's adapters, tokens, errors and decision."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class AdapterUse:
    """One adapter in one iteration's mix."""

    id: str
    name: str
    domain: str
    similarity: float
    weight: float
    contribution: float | None = None
    """Mean leave-one-out change in error: error without this adapter minus error with all (positive helps)."""
    alone_error: float | None = None
    """Mean error with this adapter alone at weight 1."""
    token_contributions: list[float] = field(default_factory=list)
    """Leave-one-out change in error at each scored token."""


@dataclass
class TokenError:
    """One scored token and its error in nats."""

    text: str
    error: float
    token_id: int


@dataclass
class Iteration:
    """One retrieve-merge-generate-check round."""

    index: int
    retrieval_query: str
    adapters: list[AdapterUse]
    merge_method: str
    execution_path: str
    error_metric: str
    answer: str
    tokens: list[TokenError]
    """The tokens the error is measured on: the reference with metric "nll", else the generated answer."""
    answer_tokens: list[TokenError]
    """The generated answer's tokens with their surprisal, whatever the metric."""
    mean_error: float
    threshold: float
    decision: str
    """"accept", "refine" or "stop"."""
    reason: str
    base_error: float | None = None
    """Mean error of the same tokens with no adapter (the baseline for contributions)."""
    seconds: float = 0.0


@dataclass
class Trace:
    """A whole routed query: the chosen answer and every iteration that led to it."""

    query: str
    reference: str | None
    final_answer: str
    final_iteration: int
    stopped_because: str
    iterations: list[Iteration]
    settings: dict[str, Any]
    stopped_by_user: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def best(self) -> Iteration:
        return self.iterations[self.final_iteration]
