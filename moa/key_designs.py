"""Compare ways of building an expert's retrieval keys, by routing accuracy and by cached LM scores.

Each design turns a segment into one or more key vectors. A query goes to the adapter whose best
key is most similar, as in the store. Accuracy is measured on the corpus's test split, whose terms
no expert saw in training, and a few probe questions show single routing decisions.

With `--teacher` (the cache that `moa train-retriever` writes), each design's top-1 adapter is
also scored by the language model. The score is the mean reference NLL with that adapter alone,
read from the cache. It covers the queries where every design's top-1 is a cached candidate.

    python -m moa.key_designs --corpus data/corpus --adapters adapters --teacher runs/retriever/teacher.pt
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapters import METADATA_FILE
from .corpus import Example, load_jsonl
from .encoder import Encoder
from .experts import LIBRARY_DOMAINS, load_splits
from .training import KEY_EXAMPLES, blend_centroids, key_centroids

PROBES = (("What is photosynthesis?", "plants"), ("Translate 'tree' into German.", "german"),
          ("What is a fjord?", "geography"), ("What is a violin?", "music"), ("What is an enzyme?", "chemistry"))


@dataclass
class SegmentEmbeddings:
    """One segment's embeddings, computed once and shared by every design."""

    prompt_centroid: torch.Tensor  # (dim,) unit centroid of the first training prompts
    pair_centroid: torch.Tensor  # (dim,) unit centroid of the same pairs, prompt and response together
    samples: torch.Tensor  # (n, dim) the sample prompts listed in moa.json


KeyDesign = Callable[[SegmentEmbeddings], torch.Tensor]  # -> (num_keys, dim)


def prompt_centroid_and_samples(embeddings: SegmentEmbeddings) -> torch.Tensor:
    """Return the design shipped before: the prompt centroid, then each sample prompt as its own key."""
    return torch.cat([embeddings.prompt_centroid.unsqueeze(0), embeddings.samples])


DESIGNS: dict[str, KeyDesign] = {
    "prompt centroid + 8 sample prompts (before)": prompt_centroid_and_samples,
    "prompt centroid": lambda embeddings: embeddings.prompt_centroid.unsqueeze(0),
    "pair centroid": lambda embeddings: embeddings.pair_centroid.unsqueeze(0),
    "prompt centroid + pair centroid (shipped)": lambda embeddings: blend_centroids(embeddings.prompt_centroid,
                                                                                    embeddings.pair_centroid),
}


def segment_embeddings(train: Sequence[Example], adapter_folder: Path, encoder: Encoder) -> SegmentEmbeddings:
    """Embed a segment's first training pairs and its expert's sample prompts."""
    prompt_centroid, pair_centroid = key_centroids(train[:KEY_EXAMPLES], encoder)
    return SegmentEmbeddings(prompt_centroid, pair_centroid, encoder.encode(_sample_queries(adapter_folder)))


def best_key_scores(queries: torch.Tensor, keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return each query's similarity to each adapter's best key. (n, dim), [(k_i, dim)] -> (n, adapters)."""
    return torch.stack([(queries @ adapter_keys.T).max(dim=1).values for adapter_keys in keys], dim=1)


def rank_metrics(scores: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """Return accuracy@1, accuracy@3 and MRR of the gold adapter. (n, adapters), (n,) -> metrics."""
    rank = (scores > scores.gather(1, gold[:, None])).sum(dim=1)  # (n,) 0 is first
    return {"accuracy@1": (rank == 0).float().mean().item(), "accuracy@3": (rank < 3).float().mean().item(),
            "mrr": (1.0 / (rank + 1).float()).mean().item()}


def compare(corpus_dir: Path, adapters_dir: Path, encoder: Encoder, domains: Sequence[str] = LIBRARY_DOMAINS,
            designs: dict[str, KeyDesign] = DESIGNS, teacher_cache: Path | None = None) -> dict:
    """Score every design on the whole test split of `domains` and on the probe questions."""
    names = list(domains)
    train = load_splits(corpus_dir)["train"]
    by_name = {name: [example for example in train if example.segment == name] for name in names}
    empty = [name for name, examples in by_name.items() if not examples]
    if empty:
        raise ValueError(f"No training pairs labelled {', '.join(empty)} in {corpus_dir}; pass domains the corpus has.")
    embeddings = [segment_embeddings(by_name[name], adapters_dir / name, encoder) for name in names]
    test = [example for example in load_jsonl(Path(corpus_dir) / "test.jsonl") if example.segment in names]
    queries = encoder.encode([example.prompt for example in test] + [probe for probe, _ in PROBES])  # (n + p, dim)
    gold = torch.tensor([names.index(example.segment) for example in test])

    results, keys_by_design = {}, {}
    for design_name, design in designs.items():
        keys = keys_by_design[design_name] = [design(segment) for segment in embeddings]
        scores = best_key_scores(queries, keys)
        metrics = rank_metrics(scores[:len(test)], gold)
        metrics["probes"] = {probe: names[index] for (probe, _), index in
                             zip(PROBES, scores[len(test):].argmax(dim=1).tolist())}
        results[design_name] = metrics
    report = {"test_queries": len(test), "domains": names, "designs": results}
    if teacher_cache is not None:
        report["teacher"] = teacher_nll(teacher_cache, keys_by_design, names)
    return report


def teacher_nll(teacher_cache: Path, keys_by_design: dict[str, list[torch.Tensor]], names: list[str]) -> dict:
    """Score each design's top-1 adapter by its cached NLL alone, on the queries every design can be scored on.

    Accuracy@1 counts every cached query; the NLL counts only those where each design's top-1 is a candidate.
    """
    rows = torch.load(teacher_cache, weights_only=False)["examples"]
    queries = F.normalize(torch.stack([row["embedding"].float() for row in rows]), dim=-1)  # (n, dim)
    gold = [row["domain"] for row in rows]
    top = {design: [names[i] for i in best_key_scores(queries, keys).argmax(dim=1).tolist()]
           for design, keys in keys_by_design.items()}
    scored = [i for i, row in enumerate(rows) if all(top[design][i] in row["candidates"] for design in top)]
    if not scored:
        raise ValueError(f"No query in {teacher_cache} has every design's top-1 adapter among its candidates.")

    results = {}
    for design, chosen in top.items():
        nll = [float(rows[i]["nll_alone"][rows[i]["candidates"].index(chosen[i])]) for i in scored]
        results[design] = {"accuracy@1": sum(c == g for c, g in zip(chosen, gold)) / len(rows),
                           "top1_nll_alone": sum(nll) / len(nll)}
    return {"queries": len(rows), "scored": len(scored), "designs": results}


def _sample_queries(folder: Path) -> list[str]:
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} is missing; the comparison reads each expert's sample queries from it. "
                                "Pass the trained library with --adapters.")
    return list(json.loads(metadata.read_text()).get("sample_queries", []))


def markdown(report: dict) -> str:
    lines = ["| keys | accuracy@1 | accuracy@3 | MRR | probes routed right |", "|---|---:|---:|---:|---:|"]
    for name, metrics in report["designs"].items():
        right = sum(metrics["probes"][probe] == wanted for probe, wanted in PROBES)
        lines.append(f"| {name} | {metrics['accuracy@1']:.3f} | {metrics['accuracy@3']:.3f} | {metrics['mrr']:.3f} | "
                     f"{right} of {len(PROBES)} |")
    if "teacher" in report:
        teacher = report["teacher"]
        lines += ["", f"Teacher-scored queries: {teacher['queries']}, {teacher['scored']} with every top-1 a candidate.", "",
                  "| keys | accuracy@1 | NLL with the top-1 adapter alone |", "|---|---:|---:|"]
        lines += [f"| {name} | {metrics['accuracy@1']:.3f} | {metrics['top1_nll_alone']:.3f} |"
                  for name, metrics in teacher["designs"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"), help="corpus folder from build-corpus")
    parser.add_argument("--adapters", type=Path, default=Path("adapters"), help="expert folders (for sample queries)")
    parser.add_argument("--teacher", type=Path, help="teacher cache of `moa train-retriever`, for the LM check")
    parser.add_argument("--out", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.teacher is not None and not args.teacher.is_file():
        parser.error(f"--teacher {args.teacher}: file not found; `moa train-retriever` writes runs/retriever/teacher.pt.")
    try:
        report = compare(args.corpus, args.adapters, Encoder(), teacher_cache=args.teacher)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"{report['test_queries']} test queries\n\n{markdown(report)}")
    for name, metrics in report["designs"].items():
        misses = {probe: got for probe, got in metrics["probes"].items() if got != dict(PROBES)[probe]}
        print(f"{name}: probe misses {misses or 'none'}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
