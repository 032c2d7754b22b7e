"""The segmented fine-tuning pipeline: corpus → segments (by label or k-means) → one LoRA expert each."""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from .corpus import Example, load_jsonl, source_licence
from .encoder import Encoder
from .models import BaseModel
from .adapters import METADATA_FILE
from .training import ExpertResult, Segment, TrainingConfig, expert_is_complete, expert_keys, train_expert, write_keys

logger = logging.getLogger(__name__)

KNOWLEDGE_DOMAINS = ("plants", "animals", "medicine", "chemistry", "food", "law", "music", "computing", "sport",
                     "military", "geography", "mathematics", "physics", "religion", "economics")
TRANSLATION_DOMAINS = ("french", "spanish", "german")
LIBRARY_DOMAINS = KNOWLEDGE_DOMAINS + TRANSLATION_DOMAINS


def load_splits(corpus_dir: Path) -> dict[str, list[Example]]:
    """Read train.jsonl, validation.jsonl and test.jsonl from a corpus folder."""
    corpus_dir = Path(corpus_dir)
    missing = [name for name in ("train", "validation") if not (corpus_dir / f"{name}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"Corpus folder {corpus_dir} lacks {', '.join(m + '.jsonl' for m in missing)}; "
                                "build it with `moa build-corpus` (or `make data`).")
    return {name: load_jsonl(corpus_dir / f"{name}.jsonl") for name in ("train", "validation", "test")
            if (corpus_dir / f"{name}.jsonl").is_file()}


def central_terms(examples: Sequence[Example], encoder: Encoder, count: int = 6, max_terms: int = 2000) -> list[str]:
    """Return the segment's terms whose embeddings lie nearest the segment's centroid."""
    terms = sorted({example.term for example in examples})[:max_terms]
    if not terms:
        return []
    embeddings = encoder.encode(terms)
    centroid = torch.nn.functional.normalize(embeddings.mean(0), dim=0)
    order = (embeddings @ centroid).argsort(descending=True)
    return [terms[i] for i in order[:count].tolist()]


def _licences(examples: Sequence[Example]) -> tuple[str, str]:
    sources = sorted({example.source for example in examples})
    licences = []
    for source in sources:
        try:
            licences.append(f"{source}: {source_licence(source)}")
        except ValueError:  # a user corpus: no licence is recorded for it
            licences.append(f"{source}: see the source's own terms")
    return ", ".join(sources), "; ".join(licences)


def label_segments(splits: dict[str, list[Example]], encoder: Encoder,
                   domains: Sequence[str] | None = None) -> list[Segment]:
    """One segment per label, named after the label; `domains` keeps only those labels, in that order."""
    by_label: dict[str, dict[str, list[Example]]] = defaultdict(lambda: defaultdict(list))
    for split, examples in splits.items():
        for example in examples:
            if example.segment:
                by_label[example.segment][split].append(example)
    wanted = list(domains) if domains else sorted(by_label)
    unknown = [label for label in wanted if label not in by_label]
    if unknown:
        raise ValueError(f"No examples labelled {unknown}; the corpus has labels {sorted(by_label)}.")

    segments = []
    for label in wanted:
        train = by_label[label]["train"]
        terms = central_terms(train, encoder)
        source, licence = _licences(train)
        segments.append(Segment(label, label, f"{label}: {', '.join(terms)}", train,
                                by_label[label]["validation"], source, licence, terms))
    return segments


def kmeans_segments(splits: dict[str, list[Example]], num_segments: int, encoder: Encoder, seed: int = 0,
                    prefix: str = "cluster", domains: Sequence[str] | None = None,
                    max_examples: int = 8000) -> list[Segment]:
    """Split the training prompts into `num_segments` balanced k-means clusters of their embeddings.

    `domains` keeps only pairs with those labels (e.g. the knowledge domains). At most
    `max_examples` training pairs are clustered, a deterministic sample, because an expert sees only
    steps × batch size pairs anyway. Validation examples go to the cluster whose centroid is
    nearest, so each expert is evaluated on data from its own region of embedding space.
    """
    from .segmentation import balanced_kmeans, describe_segments

    def keep(examples: list[Example]) -> list[Example]:
        return [e for e in examples if not domains or e.segment in domains]

    train, validation = keep(splits["train"]), keep(splits.get("validation", []))
    if len(train) > max_examples:
        train = random.Random(seed).sample(train, max_examples)
    embeddings = encoder.encode([e.prompt for e in train])
    labels = balanced_kmeans(embeddings, num_segments, seed=seed)
    centroids = torch.nn.functional.normalize(
        torch.stack([embeddings[labels == k].mean(0) for k in range(num_segments)]), dim=-1)
    validation_labels = (encoder.encode([e.prompt for e in validation]) @ centroids.T).argmax(-1) if validation else torch.empty(0)
    infos = describe_segments([e.term for e in train], labels)

    segments = []
    for k, info in enumerate(infos):
        members = [e for e, label in zip(train, labels.tolist()) if label == k]
        held_out = [e for e, label in zip(validation, validation_labels.tolist()) if label == k]
        domains = defaultdict(int)
        for example in members:
            domains[example.segment or "?"] += 1
        majority = max(domains, key=domains.get)
        source, licence = _licences(members)
        name = f"{prefix}-{info.name}" if not info.name.startswith(prefix) else info.name
        segments.append(Segment(name, majority, info.description, members, held_out, source, licence,
                                list(info.top_terms)))
    return segments


def train_library(base: BaseModel, encoder: Encoder, segments: Sequence[Segment], adapters_dir: Path,
                  runs_dir: Path, config: TrainingConfig) -> list[ExpertResult]:
    """Train every segment's expert in order; finished experts are skipped, so a rerun resumes."""
    results = []
    for number, segment in enumerate(segments, start=1):
        logger.info("Expert %d/%d: %s (%d training pairs)", number, len(segments), segment.name, len(segment.train))
        results.append(train_expert(base, segment, Path(adapters_dir), Path(runs_dir), config, encoder))
    return results


class RekeyError(ValueError):
    """Error raised when an expert folder does not match its segment. No key is written."""


def check_trained_on(folder: Path, segment: Segment) -> None:
    """Raise `RekeyError` unless `folder` contains the expert that `moa train-experts` trained on `segment`."""
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text())
    except json.JSONDecodeError as error:
        raise RekeyError(f"{folder / METADATA_FILE} is not valid JSON ({error}); retrain the expert "
                         "(`moa train-experts` without --keys-only).") from error
    expected = {"name": segment.name, "domain": segment.domain, "segment_size": len(segment.train)}
    found = {field: metadata.get(field) for field in expected}
    if found != expected:
        raise RekeyError(f"{folder} was not trained on this segment of the corpus: its moa.json has {found}, the "
                         f"segment has {expected}. Rekey it with the corpus and --segments it was trained with, or "
                         "retrain it (`moa train-experts` without --keys-only).")


def rekey_library(encoder: Encoder, segments: Sequence[Segment], adapters_dir: Path) -> list[Path]:
    """Recompute the key of every segment's trained expert, after a change of key design or encoder.

    Every folder is checked and every key computed before the first key is written, so a missing or
    foreign expert changes nothing.
    """
    folders = [Path(adapters_dir) / segment.name for segment in segments]
    missing = [folder.name for folder in folders if not folder.is_dir()]
    if missing:
        raise FileNotFoundError(f"No trained expert for {', '.join(missing)} in {adapters_dir}; train them first "
                                "(`moa train-experts` without --keys-only). No key was changed.")
    for segment, folder in zip(segments, folders):
        if not expert_is_complete(folder):
            raise RekeyError(f"{folder} is not a complete expert folder (adapter_config.json, adapter_model.safetensors, "
                             "moa.json and keys.safetensors); an imported adapter gets its keys from `moa index`. "
                             "No key was changed.")
        check_trained_on(folder, segment)

    keys = [expert_keys(segment, encoder) for segment in segments]
    for segment, folder, key in zip(segments, folders, keys):
        write_keys(folder, key, encoder.encoder_id)
        logger.info("Rewrote the key of %s", segment.name)
    return folders
