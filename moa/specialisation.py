"""Library specialisation measures: the adapter × domain NLL matrix, routing accuracy and routed NLL.

Every expert is scored on every domain's held-out pairs in one batched pass per pair: the batch
has one row per adapter (one-hot weights) plus a row with no adapter.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .corpus import Example
from .engine import MoA
from .store import AdapterStore

logger = logging.getLogger(__name__)


@dataclass
class NLLMatrix:
    """Mean response NLL (nats per token) of each adapter on each domain's pairs, and of the base model."""

    adapters: list[str]
    domains: list[str]
    nll: list[list[float]]  # (adapters, domains)
    base: list[float]  # (domains,)
    examples_per_domain: int

    def gain(self, adapter: int, domain: int) -> float:
        """NLL reduction of `adapter` on `domain` relative to the base model (positive is better)."""
        return self.base[domain] - self.nll[adapter][domain]

    def specialisation_checks(self, domain_of: dict[str, str]) -> list[dict]:
        """For each adapter with a domain in the matrix: own gain > 0, and own gain > mean gain of the others there."""
        rows = []
        for a, adapter in enumerate(self.adapters):
            domain = domain_of.get(adapter)
            if domain not in self.domains:
                continue
            d = self.domains.index(domain)
            others = [self.gain(b, d) for b in range(len(self.adapters)) if b != a]
            own = self.gain(a, d)
            rows.append({"adapter": adapter, "domain": domain, "own_gain": own,
                         "mean_other_gain": sum(others) / max(1, len(others)),
                         "below_base": own > 0, "beats_others": own > sum(others) / max(1, len(others))})
        return rows


def sample_by_domain(examples: Sequence[Example], per_domain: int, seed: int = 0) -> dict[str, list[Example]]:
    """Pick up to `per_domain` pairs of distinct terms from each segment, deterministically."""
    by_domain: dict[str, dict[str, Example]] = defaultdict(dict)
    for example in examples:
        if example.segment:
            by_domain[example.segment].setdefault(example.term, example)
    samples = {}
    for domain in sorted(by_domain):
        chosen = sorted(by_domain[domain].values(), key=lambda e: e.term)
        random.Random(seed).shuffle(chosen)
        samples[domain] = chosen[:per_domain]
    return samples


def nll_matrix(engine: MoA, adapter_ids: Sequence[str], samples: dict[str, list[Example]],
               store: AdapterStore | None = None) -> NLLMatrix:
    """Score every adapter (from `store`, default the engine's) and the base model on every domain's samples."""
    mixes = [{}] + [{adapter_id: 1.0} for adapter_id in adapter_ids]
    domains = list(samples)
    totals = torch.zeros(len(mixes), len(domains))
    pairs = [(d, example) for d, domain in enumerate(domains) for example in samples[domain]]
    for d, example in tqdm(pairs, desc="NLL matrix", leave=False):
        totals[:, d] += engine.reference_nll(example.prompt, example.response, mixes, store)
    counts = torch.tensor([max(1, len(samples[domain])) for domain in domains], dtype=torch.float32)
    means = totals / counts
    return NLLMatrix(list(adapter_ids), domains, means[1:].tolist(), means[0].tolist(),
                     max(len(v) for v in samples.values()))


@dataclass
class RoutingScores:
    """Routing quality of one library on labelled queries."""

    accuracy_at_1: float
    accuracy_at_3: float
    mrr: float
    routed_nll: float
    """Mean reference NLL with the top-1 retrieved adapter alone."""
    base_nll: float
    per_domain_accuracy_at_1: dict[str, float]
    queries: int


def routing_scores(engine: MoA, store: AdapterStore, samples: dict[str, list[Example]],
                   use_trained: bool = True, score_nll: bool = True) -> RoutingScores:
    """Retrieve from `store` for each labelled query and check the retrieved adapters' domains."""
    hits1, hits3, reciprocal, nll, base_nll = [], [], [], [], []
    per_domain: dict[str, list[float]] = defaultdict(list)
    records = store.adapters()
    for domain, examples in tqdm(samples.items(), desc="routing", leave=False):
        for example in examples:
            embedding = engine.embed_query(example.prompt, use_trained)
            retrieved = store.query(embedding, len(records))  # one Chroma round trip serves rank and top-1
            ranked = [item.record.domain for item in retrieved]
            rank = ranked.index(domain) + 1 if domain in ranked else None
            hits1.append(float(rank == 1))
            hits3.append(float(rank is not None and rank <= 3))
            reciprocal.append(1.0 / rank if rank else 0.0)
            per_domain[domain].append(float(rank == 1))
            if score_nll:
                scores = engine.reference_nll(example.prompt, example.response,
                                              [{}, {retrieved[0].adapter_id: 1.0}], store)
                base_nll.append(float(scores[0]))
                nll.append(float(scores[1]))
    mean = lambda values: sum(values) / max(1, len(values))  # noqa: E731
    return RoutingScores(mean(hits1), mean(hits3), mean(reciprocal), mean(nll), mean(base_nll),
                         {d: mean(v) for d, v in per_domain.items()}, len(hits1))


def save_heatmap(matrix: NLLMatrix, path: Path, title: str) -> None:
    """Write the gain matrix (base NLL minus adapter NLL) as a PNG heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gains = torch.tensor(matrix.base).unsqueeze(0) - torch.tensor(matrix.nll)  # (adapters, domains)
    figure, axis = plt.subplots(figsize=(1.0 + 0.5 * len(matrix.domains), 1.0 + 0.42 * len(matrix.adapters)))
    limit = float(gains.abs().max())
    image = axis.imshow(gains.numpy(), cmap="RdBu", vmin=-limit, vmax=limit)
    axis.set_xticks(range(len(matrix.domains)), matrix.domains, rotation=60, ha="right")
    axis.set_yticks(range(len(matrix.adapters)), matrix.adapters)
    axis.set_xlabel("validation domain")
    axis.set_ylabel("adapter")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label="NLL gain over the base model (nats/token)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def matrix_markdown(matrix: NLLMatrix) -> str:
    """Render the matrix as a Markdown table, base model first, the best adapter per domain in bold."""
    header = "| adapter \\ domain | " + " | ".join(matrix.domains) + " |"
    rule = "|---|" + "---:|" * len(matrix.domains)
    lines = [header, rule, "| *base model* | " + " | ".join(f"{v:.3f}" for v in matrix.base) + " |"]
    best = [min(range(len(matrix.adapters)), key=lambda a: matrix.nll[a][d]) for d in range(len(matrix.domains))]
    for a, adapter in enumerate(matrix.adapters):
        cells = [f"**{value:.3f}**" if best[d] == a else f"{value:.3f}" for d, value in enumerate(matrix.nll[a])]
        lines.append(f"| {adapter} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_matrix(matrix: NLLMatrix, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(matrix), indent=1) + "\n")


def library_checks_markdown(checks: list[dict]) -> str:
    lines = ["| adapter | own-domain gain | mean gain of the other adapters there | below base | beats the others |",
             "|---|---:|---:|:-:|:-:|"]
    for row in checks:
        lines.append(f"| {row['adapter']} | {row['own_gain']:+.3f} | {row['mean_other_gain']:+.3f} | "
                     f"{'yes' if row['below_base'] else 'no'} | {'yes' if row['beats_others'] else 'no'} |")
    return "\n".join(lines)


def open_library_store(engine: MoA, folder: Path, store_path: Path) -> AdapterStore:
    """Index a second library (e.g. the k-means one) into its own store, beside the engine's."""
    from .indexing import index_folder

    store = AdapterStore.open(engine.base.model_id, engine.encoder.encoder_id, store_path)
    index_folder(folder, store, engine.encoder, engine.module_shapes)
    return store
