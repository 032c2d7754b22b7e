"""Registering adapter folders in the store: validate everything first, then write.

`index_folder` makes the store match a folder of adapters: new adapters are added, changed
ones (another fingerprint) replaced, and adapters registered from that folder whose
sub-folder is gone are removed. Running it twice changes nothing the second time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import (AdapterId, AdapterInfo, InvalidAdapterError, is_adapter_folder, load_lora_weights, read_adapter,
                       validate_adapter)
from .encoder import Encoder
from .store import AdapterStore, IndexReport

logger = logging.getLogger(__name__)


class IndexingError(ValueError):
    """One or more adapters were rejected; nothing was written."""


@dataclass
class Candidate:
    info: AdapterInfo
    keys: torch.Tensor  # (num_keys, dim)


def adapter_keys(info: AdapterInfo, encoder: Encoder) -> torch.Tensor:
    """Use the adapter's precomputed keys when they come from this encoder; otherwise embed its key texts."""
    if info.keys is not None and info.keys_encoder == encoder.encoder_id and info.keys.shape[1] == encoder.dim:
        return torch.nn.functional.normalize(info.keys.float(), dim=-1)
    texts = info.key_texts()
    if not texts:
        raise InvalidAdapterError(info.adapter_id, "it has no keys for this encoder and no name, description or "
                                                   "sample queries to compute them from.")
    return encoder.encode(texts)


def validate_folder(folder: Path, store: AdapterStore, encoder: Encoder, module_shapes: dict[str, tuple[int, int]],
                    adapter_id: AdapterId | None = None) -> Candidate:
    """Read and validate one adapter folder and compute its keys; raise `InvalidAdapterError` if it is rejected."""
    info = read_adapter(folder, adapter_id)
    validate_adapter(info, load_lora_weights(info), store.model_id, module_shapes)
    return Candidate(info, adapter_keys(info, encoder))


def prepare(folders: Sequence[Path], store: AdapterStore, encoder: Encoder,
            module_shapes: dict[str, tuple[int, int]]) -> tuple[list[Candidate], list[InvalidAdapterError]]:
    """Read and validate adapter folders without touching the store. Returns the accepted and the rejections."""
    accepted, rejected = [], []
    for folder in folders:
        try:
            accepted.append(validate_folder(folder, store, encoder, module_shapes))
        except InvalidAdapterError as error:
            rejected.append(error)
    return accepted, rejected


def adapter_folders(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Adapter folder {folder} does not exist.")
    return sorted(child for child in folder.iterdir() if child.is_dir() and is_adapter_folder(child))


def index_folder(folder: Path, store: AdapterStore, encoder: Encoder, module_shapes: dict[str, tuple[int, int]],
                 skip_invalid: bool = False) -> IndexReport:
    """Make the store match `folder`. Any rejected adapter aborts before writing, unless `skip_invalid`."""
    folder = Path(folder).resolve()
    accepted, rejected = prepare(adapter_folders(folder), store, encoder, module_shapes)
    if rejected and not skip_invalid:
        reasons = "\n".join(f"  - {error}" for error in rejected)
        raise IndexingError(f"{len(rejected)} adapter(s) in {folder} rejected; the store was not changed:\n{reasons}")
    for error in rejected:
        logger.warning("Skipped: %s", error)

    report = IndexReport()
    registered = store.adapters()
    key_counts = store.key_counts()
    present = {candidate.info.adapter_id for candidate in accepted}
    changed = []
    for candidate in accepted:
        previous = registered.get(candidate.info.adapter_id)
        if previous is None:
            report.added.append(candidate.info.adapter_id)
            changed.append(candidate)
        elif (previous.fingerprint != candidate.info.fingerprint or previous.path != str(candidate.info.path)
              or key_counts.get(previous.adapter_id) != previous.num_keys):  # a write interrupted mid-way
            report.updated.append(candidate.info.adapter_id)
            changed.append(candidate)
        else:
            report.unchanged.append(candidate.info.adapter_id)
    report.removed = [adapter_id for adapter_id, record in registered.items()
                      if adapter_id not in present and Path(record.path).parent == folder]
    # Key records whose first record (key_index 0) was lost are invisible to `adapters()`; drop them too.
    orphans = [adapter_id for adapter_id in key_counts if adapter_id not in registered and adapter_id not in present]

    if changed:
        store.register([(candidate.info, candidate.keys) for candidate in changed])
    if report.removed:
        store.remove(report.removed)
    if orphans:
        store.delete_records(orphans)
    return report


def register_folder(folder: Path, store: AdapterStore, encoder: Encoder,
                    module_shapes: dict[str, tuple[int, int]]) -> AdapterInfo:
    """Validate and register one adapter folder; raise `InvalidAdapterError` and write nothing if it is rejected."""
    accepted, rejected = prepare([Path(folder)], store, encoder, module_shapes)
    if rejected:
        raise rejected[0]
    store.register([(accepted[0].info, accepted[0].keys)])
    return accepted[0].info
