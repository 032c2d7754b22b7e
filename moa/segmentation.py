"""Unsupervised segments: balanced k-means over prompt embeddings, and readable cluster names.

When a corpus has no segment labels, its prompts are embedded and clustered with
`balanced_kmeans` into segments of nearly equal size, so every expert adapter gets a similar
amount of training data. `describe_segments` then names each cluster after its most typical
words.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moa.corpus import Example

logger = logging.getLogger(__name__)

STOPWORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers him his how i if in into is it its itself just
    me more most my no nor not of off on once only or other our out over own same she should so
    some such than that the their them then there these they this those through to too under
    until up very was we were what when where which while who whom why will with would you your
    """.split()
)
"""Common English function words, which carry no information about a segment's topic."""

TEMPLATE_WORDS = frozenset(
    """
    what define definition word words mean meaning means explain translate translation say
    use used sentence example give short describe tell known refer name term one into
    """.split()
)
"""Words of the corpus prompt templates ("What does the word 'X' mean?"), equally common in
every segment."""

_WORD_PATTERN = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")
MIN_WORD_CHARS = 3


@dataclass
class SegmentInfo:
    """Summary of one unsupervised segment, for logs, model cards and the router's index."""

    index: int
    """Cluster label, as returned by `balanced_kmeans`."""
    name: str
    """Slug such as "cluster-03-volcano", usable as an adapter name."""
    description: str
    """One line such as "Questions about: volcano, lava, crater."."""
    size: int
    """Number of texts in the segment."""
    top_terms: list[str] = field(default_factory=list)
    """Most typical words of the segment, most typical first."""

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"SegmentInfo.index must be at least 0, got {self.index}.")
        if self.size < 0:
            raise ValueError(f"SegmentInfo.size must be at least 0, got {self.size}.")
        if not self.name:
            raise ValueError("SegmentInfo.name must be a non-empty string.")


# --------------------------------------------------------------------------------------------
# Balanced k-means


def _check_kmeans_arguments(embeddings: torch.Tensor, num_segments: int, iterations: int) -> None:
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings must be a 2-D tensor (num_points, dim), got {shape}.")
    num_points = embeddings.shape[0]
    if num_segments < 1:
        raise ValueError(f"num_segments must be at least 1, got {num_segments}.")
    if num_segments > num_points:
        raise ValueError(
            f"num_segments ({num_segments}) must not exceed the number of points ({num_points}); "
            "use fewer segments or more data."
        )
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}.")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values; check the encoder output.")
    if (embeddings.norm(dim=1) == 0).any():
        raise ValueError("embeddings contain all-zero rows, which have no direction for cosine k-means.")


def _init_centroids(points: torch.Tensor, num_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Pick initial centroids with k-means++ under cosine distance (1 - similarity)."""
    num_points = points.shape[0]
    first = int(torch.randint(num_points, (1,), generator=generator))
    chosen = [first]
    distance = (1 - points @ points[first]).clamp(min=0).cpu()  # (n,)
    for _ in range(1, num_segments):
        weights = distance**2
        weights[chosen] = 0
        if weights.sum() <= 0:  # the other points coincide with centroids, so any of them will do
            weights = torch.ones_like(weights)
            weights[chosen] = 0
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        distance = torch.minimum(distance, (1 - points @ points[index]).clamp(min=0).cpu())
    return points[chosen].clone()  # (k, d)


def assign_with_capacity(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each point to a cluster so that no cluster gets more than `capacity` points.

    The assignment is greedy by score and runs in rounds. In each round every unassigned point
    requests its best open cluster. A cluster with more requests than free places takes the
    points with the highest scores and closes. Each round closes a cluster or assigns every
    point, so there are at most k rounds. `scores` is (n, k), higher is better, and
    capacity * k must be at least n.
    """
    num_points, num_clusters = scores.shape
    if capacity * num_clusters < num_points:
        raise ValueError(
            f"capacity {capacity} for {num_clusters} clusters cannot hold {num_points} points; "
            f"use a capacity of at least {math.ceil(num_points / num_clusters)}."
        )
    labels = torch.full((num_points,), -1, dtype=torch.long, device=scores.device)
    remaining = [capacity] * num_clusters
    unassigned = torch.arange(num_points, device=scores.device)
    while unassigned.numel() > 0:
        closed = torch.tensor([room == 0 for room in remaining], device=scores.device)
        best_scores, choices = scores[unassigned].masked_fill(closed, float("-inf")).max(dim=1)  # (m,), (m,)
        for cluster in range(num_clusters):
            members = (choices == cluster).nonzero().squeeze(1)
            if members.numel() == 0:
                continue
            if members.numel() > remaining[cluster]:
                order = torch.argsort(best_scores[members], descending=True, stable=True)
                members = members[order[: remaining[cluster]]]
            labels[unassigned[members]] = cluster
            remaining[cluster] -= members.numel()
        unassigned = unassigned[labels[unassigned] == -1]
    return labels


def fill_small_clusters(scores: torch.Tensor, labels: torch.Tensor, minimum: int) -> torch.Tensor:
    """Move points into clusters with fewer than `minimum` points, at the smallest loss of score.

    Only clusters with more than `minimum` points give points away, so when `minimum` is
    floor(n / k) and no cluster exceeds ceil(n / k), every cluster ends with floor(n / k) or
    ceil(n / k) points. `scores` is (n, k) and `labels` (n,); returns new labels.
    """
    labels = labels.clone()
    num_clusters = scores.shape[1]
    sizes = torch.bincount(labels, minlength=num_clusters)  # (k,)
    for cluster in range(num_clusters):
        while sizes[cluster] < minimum:
            donors = (sizes[labels] > minimum) & (labels != cluster)  # (n,) points that may move
            loss = scores.gather(1, labels.unsqueeze(1)).squeeze(1) - scores[:, cluster]  # (n,)
            point = int(torch.argmin(loss.masked_fill(~donors, float("inf"))))
            sizes[labels[point]] -= 1
            sizes[cluster] += 1
            labels[point] = cluster
    return labels


def _update_centroids(points: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Return the normalised mean of each cluster; an empty cluster takes the worst-fitting point."""
    num_clusters = centroids.shape[0]
    sums = torch.zeros_like(centroids).index_add_(0, labels, points)  # (k, d)
    counts = torch.bincount(labels, minlength=num_clusters)  # (k,)
    new_centroids = F.normalize(sums, dim=1)
    empty = (counts == 0).nonzero().squeeze(1).tolist()
    if empty:
        fit = (points * centroids[labels]).sum(dim=1)  # (n,) similarity to own centroid
        worst = torch.argsort(fit, stable=True)[: len(empty)]
        new_centroids[empty] = points[worst]
    return new_centroids


def _balanced_assignment(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    num_points, num_segments = points.shape[0], centroids.shape[0]
    scores = points @ centroids.T  # (n, k)
    labels = assign_with_capacity(scores, math.ceil(num_points / num_segments))
    return fill_small_clusters(scores, labels, num_points // num_segments)


def balanced_kmeans(
    embeddings: torch.Tensor, num_segments: int, iterations: int = 20, seed: int = 0
) -> torch.Tensor:
    """Cluster embeddings by cosine similarity into segments of floor(n / k) to ceil(n / k) points.

    Returns (n,) long labels in [0, num_segments), and no segment is empty. Rows are
    L2-normalised here as well, so unnormalised input is clustered by direction. The result
    depends only on the input and `seed`. Stops early when an iteration changes no label.
    """
    _check_kmeans_arguments(embeddings, num_segments, iterations)
    points = F.normalize(embeddings.detach().float(), dim=1)  # (n, d)
    generator = torch.Generator().manual_seed(seed)
    centroids = _init_centroids(points, num_segments, generator)  # (k, d)

    labels = _balanced_assignment(points, centroids)
    for iteration in range(1, iterations):
        centroids = _update_centroids(points, labels, centroids)
        new_labels = _balanced_assignment(points, centroids)
        if torch.equal(new_labels, labels):
            logger.debug("Balanced k-means converged after %d iterations", iteration)
            break
        labels = new_labels
    return labels


# --------------------------------------------------------------------------------------------
# Naming segments


def content_words(text: str) -> list[str]:
    """Return the lower-case words of `text` without stopwords, template words and short words."""
    words = _WORD_PATTERN.findall(text.lower())
    return [
        word
        for word in words
        if len(word) >= MIN_WORD_CHARS and word not in STOPWORDS and word not in TEMPLATE_WORDS
    ]


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


def _label_list(labels: torch.Tensor | Sequence[int], num_texts: int) -> list[int]:
    values = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if len(values) != num_texts:
        raise ValueError(f"Expected one label per text: got {len(values)} labels for {num_texts} texts.")
    if any(not isinstance(value, numbers.Integral) or value < 0 for value in values):
        raise ValueError("Labels must be non-negative integers, as returned by balanced_kmeans.")
    return values


def typical_terms(word_counts: dict[int, Counter[str]], top_n: int) -> dict[int, list[str]]:
    """Rank each segment's words by a class-based TF-IDF score, most typical first.

    score(w, s) = (count of w in s / words in s) * log(1 + mean words per segment / count of w
    in the whole corpus). A word scores high when it is frequent in the segment and rare
    overall; segments play the part of documents in TF-IDF.
    """
    totals: Counter[str] = Counter()
    for counts in word_counts.values():
        totals.update(counts)
    mean_words = sum(totals.values()) / max(len(word_counts), 1)
    ranked = {}
    for segment, counts in word_counts.items():
        segment_words = sum(counts.values())
        scores = {
            word: (count / segment_words) * math.log(1 + mean_words / totals[word]) for word, count in counts.items()
        }
        ranked[segment] = sorted(scores, key=lambda word: (-scores[word], word))[:top_n]
    return ranked


def describe_segments(
    texts: Sequence[str], labels: torch.Tensor | Sequence[int], top_n: int = 5
) -> list[SegmentInfo]:
    """Name each segment after its most typical words, one SegmentInfo per label, by label.

    Stopwords and prompt-template words ("what", "define", "translate") are skipped, so the
    names come from the topics: e.g. "cluster-03-volcano", "Questions about: volcano, lava.".
    """
    if top_n < 1:
        raise ValueError(f"top_n must be at least 1, got {top_n}.")
    values = _label_list(labels, len(texts))
    word_counts: dict[int, Counter[str]] = {label: Counter() for label in sorted(set(values))}
    for text, label in zip(texts, values):
        word_counts[label].update(content_words(text))
    sizes = Counter(values)
    ranked = typical_terms(word_counts, top_n)

    infos = []
    for label, terms in ranked.items():
        name = f"cluster-{label:02d}" + (f"-{_slug(terms[0])}" if terms and _slug(terms[0]) else "")
        description = f"Questions about: {', '.join(terms)}." if terms else "Questions with no distinctive words."
        infos.append(SegmentInfo(index=label, name=name, description=description, size=sizes[label], top_terms=terms))
    return infos


def segment_by_label(examples: Iterable[Example]) -> dict[str, list[Example]]:
    """Group examples by their `segment`, keeping their order; segments come sorted by name.

    Raises ValueError for an example without a segment: label the corpus first, e.g. with
    `balanced_kmeans` and `describe_segments`.
    """
    groups: dict[str, list[Example]] = {}
    for example in examples:
        if example.segment is None:
            raise ValueError(
                f"Example {example.prompt[:60]!r} has no segment; label every example before "
                "grouping, e.g. with balanced_kmeans and describe_segments."
            )
        groups.setdefault(example.segment, []).append(example)
    return dict(sorted(groups.items()))
