"""Tests for moa.segmentation: balanced k-means, segment names and grouping."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from moa.corpus import Example
from moa.segmentation import (
    SegmentInfo,
    assign_with_capacity,
    balanced_kmeans,
    content_words,
    describe_segments,
    fill_small_clusters,
    segment_by_label,
)


def make_blobs(
    sizes: list[int], dim: int = 16, noise: float = 0.05, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return L2-normalised points around len(sizes) random directions, and their true labels."""
    generator = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(len(sizes), dim, generator=generator), dim=1)
    points = [centers[index] + noise * torch.randn(size, dim, generator=generator) for index, size in enumerate(sizes)]
    labels = torch.cat([torch.full((size,), index) for index, size in enumerate(sizes)])
    return F.normalize(torch.cat(points), dim=1), labels


def test_balanced_kmeans_recovers_clusters():
    points, truth = make_blobs([40, 40, 40, 40])
    labels = balanced_kmeans(points, 4)
    assert labels.shape == (160,)
    assert labels.dtype == torch.long
    for cluster in range(4):
        true_labels = truth[labels == cluster].unique()
        assert true_labels.numel() == 1, f"cluster {cluster} mixes true clusters {true_labels.tolist()}"


def test_balanced_kmeans_respects_capacity():
    # 60 points near one direction and 10 near another: plain k-means would give 60/10.
    points, _ = make_blobs([60, 10])
    labels = balanced_kmeans(points, 2)
    assert torch.bincount(labels, minlength=2).tolist() == [35, 35]


@pytest.mark.parametrize(("num_points", "num_segments"), [(10, 3), (23, 5), (7, 7), (5, 1)])
def test_balanced_kmeans_size_bounds(num_points: int, num_segments: int):
    points = F.normalize(torch.randn(num_points, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    labels = balanced_kmeans(points, num_segments)
    sizes = torch.bincount(labels, minlength=num_segments)
    assert int(sizes.max()) <= -(-num_points // num_segments)
    assert int(sizes.min()) >= num_points // num_segments
    assert int(labels.min()) >= 0
    assert int(labels.max()) < num_segments


def test_balanced_kmeans_is_deterministic():
    points = F.normalize(torch.randn(101, 12, generator=torch.Generator().manual_seed(2)), dim=1)
    first = balanced_kmeans(points, 6, seed=5)
    second = balanced_kmeans(points.clone(), 6, seed=5)
    assert torch.equal(first, second)


def test_balanced_kmeans_normalises_input():
    points, _ = make_blobs([20, 20, 20])
    scaled = points * torch.linspace(0.5, 3.0, 60).unsqueeze(1)
    assert torch.equal(balanced_kmeans(points, 3), balanced_kmeans(scaled, 3))


def test_balanced_kmeans_identical_points():
    points = F.normalize(torch.ones(9, 4), dim=1)
    labels = balanced_kmeans(points, 3)
    assert torch.bincount(labels, minlength=3).tolist() == [3, 3, 3]


@pytest.mark.parametrize(
    ("embeddings", "num_segments", "iterations", "message"),
    [
        (torch.randn(10, 4), 0, 20, "num_segments must be at least 1, got 0"),
        (torch.randn(3, 4), 4, 20, r"num_segments \(4\) must not exceed the number of points \(3\)"),
        (torch.randn(10), 2, 20, r"embeddings must be a 2-D tensor \(num_points, dim\), got \(10,\)"),
        (torch.randn(10, 4), 2, 0, "iterations must be at least 1, got 0"),
        (torch.zeros(4, 3), 2, 20, "all-zero rows"),
        (torch.full((4, 3), float("nan")), 2, 20, "NaN or infinite"),
    ],
)
def test_balanced_kmeans_rejects_invalid_input(embeddings, num_segments: int, iterations: int, message: str):
    with pytest.raises(ValueError, match=message):
        balanced_kmeans(embeddings, num_segments, iterations)


def _total_score(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float(scores[torch.arange(len(labels)), labels].sum())


def test_assign_with_capacity_matches_brute_force():
    # Small enough to try every assignment that respects the capacity.
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.2, 0.3], [0.95, 0.0]])
    labels = assign_with_capacity(scores, capacity=2)
    feasible = [
        torch.tensor(choice)
        for choice in itertools.product(range(2), repeat=4)
        if max(choice.count(0), choice.count(1)) <= 2
    ]
    best = max(_total_score(scores, choice) for choice in feasible)
    assert labels.tolist() == [0, 1, 1, 0]
    assert _total_score(scores, labels) == pytest.approx(best)


def test_fill_small_clusters_moves_cheapest_point():
    # Greedy capacity 3 leaves cluster 2 empty; the point that loses least by moving goes there.
    scores = torch.tensor([[0.9, 0.0, 0.1], [0.8, 0.0, 0.7], [0.9, 0.1, 0.0], [0.0, 0.9, 0.0], [0.0, 0.8, 0.5]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    filled = fill_small_clusters(scores, labels, minimum=1)
    assert filled.tolist() == [0, 2, 0, 1, 1]
    assert labels.tolist() == [0, 0, 0, 1, 1]  # the input is not changed


def test_assign_with_capacity_rejects_small_capacity():
    with pytest.raises(ValueError, match="capacity 1 for 2 clusters cannot hold 3 points"):
        assign_with_capacity(torch.zeros(3, 2), capacity=1)


# --------------------------------------------------------------------------------------------
# Names and groups

TEXTS = [
    "What is a volcano?",
    "Define lava.",
    "What does the word 'crater' mean?",
    "Explain what a volcano is.",
    "What is the meaning of 'magma' in a volcano?",
    "What is a violin?",
    "Define cello.",
    "What does the word 'violin' mean?",
    "Give a short definition of bow for a violin.",
    "Translate 'violin' into German.",
]
LABELS = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_describe_segments_picks_topic_words():
    infos = describe_segments(TEXTS, torch.tensor(LABELS), top_n=3)
    assert [info.index for info in infos] == [0, 1]
    assert infos[0].top_terms[0] == "volcano"
    assert infos[1].top_terms[0] == "violin"
    assert infos[0].name == "cluster-00-volcano"
    assert infos[1].name == "cluster-01-violin"
    assert infos[0].description.startswith("Questions about: volcano, ")
    assert [info.size for info in infos] == [5, 5]


def test_describe_segments_skips_template_words():
    infos = describe_segments(TEXTS, LABELS, top_n=10)
    all_terms = {term for info in infos for term in info.top_terms}
    assert not all_terms & {"what", "define", "word", "mean", "meaning", "translate", "explain", "short"}


def test_describe_segments_without_content_words():
    infos = describe_segments(["What is it?", "Define it."], [3, 3])
    expected = SegmentInfo(
        index=3, name="cluster-03", description="Questions with no distinctive words.", size=2, top_terms=[]
    )
    assert infos == [expected]


def test_describe_segments_label_count_mismatch():
    with pytest.raises(ValueError, match="got 2 labels for 3 texts"):
        describe_segments(["a", "b", "c"], [0, 1])


def test_content_words_keeps_accents():
    words = content_words("Wie sagt man 'Bäume' auf Französisch?")
    assert words == ["wie", "sagt", "man", "bäume", "auf", "französisch"]


def test_segment_by_label_groups_in_order():
    examples = [
        Example("What is a violin?", "An instrument.", segment="music"),
        Example("What is a tort?", "A wrong.", segment="law"),
        Example("What is a cello?", "An instrument.", segment="music"),
    ]
    groups = segment_by_label(examples)
    assert list(groups) == ["law", "music"]
    assert [example.prompt for example in groups["music"]] == ["What is a violin?", "What is a cello?"]


def test_segment_by_label_rejects_unlabelled():
    with pytest.raises(ValueError, match=r"Example 'What is a violin\?' has no segment"):
        segment_by_label([Example("What is a violin?", "An instrument.")])
