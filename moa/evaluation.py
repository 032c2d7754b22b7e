"""`moa eval`: does retrieving and merging adapters beat the alternatives?

Every configuration is scored by the mean per-token NLL of the reference answer. All
configurations except `topk_refine` are scored for a query in one batched forward pass, one
row per mix; `topk_refine` runs the full loop with the reference as its error signal.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .config import RouteSettings
from .engine import MoA
from .weighting import relevance_weights

CONFIGS = ("base", "uniform", "random", "top1", "topk", "topk_refine", "oracle", "topk_untrained")


@dataclass
class EvalQuery:
    """One labelled query: `domains` are the adapter domains that count as correct routes."""

    query: str
    reference: str
    domains: list[str] = field(default_factory=list)


@dataclass
class ConfigResult:
    """One configuration's outcome on one query."""

    nll: float
    adapters: dict[str, float]
    hit_at_1: bool | None
    hit_at_3: bool | None
    iterations: int = 1


def load_queries(path: Path) -> list[EvalQuery]:
    """Read `{"query", "reference", "domains"?}` lines; a corpus line's `prompt`/`response`/`segment` also work."""
    queries = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: invalid JSON ({error}).") from error
        query, reference = row.get("query", row.get("prompt")), row.get("reference", row.get("response"))
        if not isinstance(query, str) or not isinstance(reference, str) or not query.strip() or not reference.strip():
            raise ValueError(f"{path}:{number}: expected non-empty string fields \"query\" and \"reference\".")
        domains = row.get("domains", [row["segment"]] if row.get("segment") else [])
        queries.append(EvalQuery(query, reference, list(domains)))
    if not queries:
        raise ValueError(f"{path} contains no queries; add lines of {{\"query\", \"reference\"}}.")
    return queries


def sample_test_queries(corpus_dir: Path, per_domain: int, seed: int = 0) -> list[EvalQuery]:
    """Queries from the corpus's test split: `per_domain` distinct terms per segment."""
    from .corpus import load_jsonl
    from .specialisation import sample_by_domain

    samples = sample_by_domain(load_jsonl(Path(corpus_dir) / "test.jsonl"), per_domain, seed)
    return [EvalQuery(e.prompt, e.response, [domain]) for domain, examples in samples.items() for e in examples]


def _hits(domains_of: Sequence[str], wanted: Sequence[str]) -> tuple[bool | None, bool | None]:
    if not wanted or not domains_of:
        return None, None
    return domains_of[0] in wanted, any(domain in wanted for domain in domains_of[:3])


class Evaluator:
    """Runs the configurations on one query at a time."""

    def __init__(self, engine: MoA, settings: RouteSettings, configs: Sequence[str], seed: int = 0) -> None:
        unknown = [name for name in configs if name not in CONFIGS]
        if unknown:
            raise ValueError(f"Unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}.")
        self.engine = engine
        self.settings = settings
        self.configs = [name for name in configs if name != "topk_untrained" or engine.query_head is not None]
        self.records = engine.store.adapters()
        self.random = random.Random(seed)

    def _ranked(self, query: str, use_trained: bool):
        return self.engine.retrieve(query, len(self.records), use_trained=use_trained)

    def mixes(self, query: EvalQuery) -> dict[str, tuple[dict[str, float], list[str]]]:
        """Each batched configuration's mix and the domains of its adapters in rank order."""
        k = self.settings.top_k
        ranked = self._ranked(query.query, self.settings.use_trained_retriever)

        def topk(items) -> dict[str, float]:
            weights = relevance_weights(torch.tensor([i.similarity for i in items[:k]]), self.settings.weighting,
                                        self.settings.temperature)
            return {item.adapter_id: float(w) for item, w in zip(items[:k], weights)}

        picked = self.random.sample(sorted(self.records), min(k, len(self.records)))
        mixes = {
            "base": ({}, []),
            "uniform": ({adapter_id: 1.0 / len(self.records) for adapter_id in self.records}, []),
            "random": ({adapter_id: 1.0 / len(picked) for adapter_id in picked},
                       [self.records[adapter_id].domain for adapter_id in picked]),
            "top1": ({ranked[0].adapter_id: 1.0}, [ranked[0].record.domain]),
            "topk": (topk(ranked), [item.record.domain for item in ranked]),
        }
        if "topk_untrained" in self.configs:
            untrained = self._ranked(query.query, use_trained=False)
            mixes["topk_untrained"] = (topk(untrained), [item.record.domain for item in untrained])
        return mixes

    def evaluate(self, query: EvalQuery) -> dict[str, ConfigResult]:
        mixes = self.mixes(query)
        singles = sorted(self.records)
        rows = [mix for mix, _ in mixes.values()] + [{adapter_id: 1.0} for adapter_id in singles]
        nll = self.engine.reference_nll(query.query, query.reference, rows)  # (rows,)

        results = {}
        for position, (name, (mix, domains)) in enumerate(mixes.items()):
            if name in self.configs:
                results[name] = ConfigResult(float(nll[position]), mix, *_hits(domains, query.domains))
        single_nll = nll[len(mixes):]
        best = int(single_nll.argmin())
        if "oracle" in self.configs:
            results["oracle"] = ConfigResult(float(single_nll[best]), {singles[best]: 1.0},
                                             *_hits([self.records[singles[best]].domain], query.domains))
        if "topk_refine" in self.configs:
            results["topk_refine"] = self.refine(query)
        return results

    def refine(self, query: EvalQuery) -> ConfigResult:
        trace = self.engine.route(query.query, self.settings, reference=query.reference)
        best = trace.best
        domains = [adapter.domain for adapter in sorted(best.adapters, key=lambda a: -a.weight)]
        return ConfigResult(best.mean_error, {a.id: a.weight for a in best.adapters}, *_hits(domains, query.domains),
                            iterations=len(trace.iterations))


def aggregate(rows: list[dict], configs: Sequence[str]) -> dict[str, dict]:
    """Per configuration: routing accuracy @1 and @3, mean NLL, and the fraction of the oracle's gain recovered."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    base = mean([row["results"]["base"]["nll"] for row in rows if "base" in row["results"]])
    oracle = mean([row["results"]["oracle"]["nll"] for row in rows if "oracle" in row["results"]])
    summary = {}
    for name in configs:
        results = [row["results"][name] for row in rows if name in row["results"]]
        if not results:
            continue
        mean_nll = mean([r["nll"] for r in results])
        recovered = None
        if base is not None and oracle is not None and base - oracle > 1e-9:
            recovered = (base - mean_nll) / (base - oracle)
        summary[name] = {
            "routing_acc@1": mean([None if r["hit_at_1"] is None else float(r["hit_at_1"]) for r in results]),
            "routing_acc@3": mean([None if r["hit_at_3"] is None else float(r["hit_at_3"]) for r in results]),
            "mean_nll": mean_nll,
            "oracle_gain_recovered": recovered,
            "mean_iterations": mean([r["iterations"] for r in results]),
        }
    return summary


def per_domain(rows: list[dict], configs: Sequence[str]) -> dict[str, dict[str, dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        for domain in row["domains"] or ["(none)"]:
            groups[domain].append(row)
    return {domain: aggregate(group, configs) for domain, group in sorted(groups.items())}


def run_eval(engine: MoA, queries: Sequence[EvalQuery], settings: RouteSettings, configs: Sequence[str]) -> dict:
    evaluator = Evaluator(engine, settings, configs)
    rows = []
    for query in tqdm(queries, desc="eval"):
        results = evaluator.evaluate(query)
        rows.append({"query": query.query, "reference": query.reference, "domains": query.domains,
                     "results": {name: result.__dict__ for name, result in results.items()}})
    return {"configs": aggregate(rows, evaluator.configs), "per_domain": per_domain(rows, evaluator.configs),
            "queries": rows, "settings": settings.__dict__}


def markdown_table(summary: dict[str, dict]) -> str:
    def cell(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = ["| configuration | routing acc@1 | routing acc@3 | mean NLL | oracle gain recovered | iterations |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in summary.items():
        lines.append(f"| {name} | {cell(row['routing_acc@1'])} | {cell(row['routing_acc@3'])} | "
                     f"{cell(row['mean_nll'])} | {cell(row['oracle_gain_recovered'])} | {cell(row['mean_iterations'], 2)} |")
    return "\n".join(lines)
