"""`moa import`: copy external PEFT adapters into the library folder and register them.

A source is a PEFT adapter folder, a folder of adapter folders, or a Hugging Face repo id. A repo
id resolves through the hub, or through the local Hugging Face cache when the hub is offline.
Every adapter of a source goes through the checks of `moa index` before anything is written. The
copies are made in a hidden staging folder inside the library, checked again there, and renamed
into place, so the library never contains a half-copied adapter and a rejection changes neither the
library nor the store.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import (CONFIG_FILE, KEYS_FILE, METADATA_FILE, WEIGHTS_FILE, AdapterId, InvalidAdapterError,
                       fingerprint_folder, is_adapter_folder)
from .encoder import Encoder
from .indexing import Candidate, adapter_folders, validate_folder
from .store import AdapterRecord, AdapterStore

logger = logging.getLogger(__name__)

COPIED_FILES = (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE, KEYS_FILE, "README.md")
"""Files copied from a source adapter; README.md is the model card, which carries the licence."""
HUB_PATTERNS = [pattern for name in COPIED_FILES for pattern in (name, f"*/{name}")]
"""Files fetched from a hub repo: one adapter at its root, or one per top-level sub-folder."""
STAGING_PREFIX = ".import-"
_REPO_ID_PATTERN = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class AdapterSourceError(ValueError):
    """An import source does not exist, contains no adapter, or could not be fetched from the hub."""


class ImportRejectedError(ValueError):
    """One or more adapters of a source were rejected; the library folder and the store are unchanged."""


@dataclass
class ImportReport:
    """Outcome of `import_adapters`: the adapter ids it copied and registered, and those already in place."""

    source: str
    library: Path
    imported: list[AdapterId] = field(default_factory=list)
    unchanged: list[AdapterId] = field(default_factory=list)


@dataclass
class _Entry:
    """One adapter of a source, validated, with where it goes in the library."""

    candidate: Candidate
    target: Path
    needs_copy: bool
    registered: bool


def resolve_source(source: str, hub_cache: Path | None = None) -> tuple[Path, str]:
    """Return the local folder of `source` and the adapter id it implies when it is a single adapter."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AdapterSourceError(f"{source} is a file; pass a PEFT adapter folder, a folder of them, or a "
                                     "Hugging Face repo id.")
        return path.resolve(), path.resolve().name
    if not _REPO_ID_PATTERN.match(source):
        raise AdapterSourceError(f"{source} is neither an existing folder nor a Hugging Face repo id (OWNER/NAME).")
    try:
        return download_from_hub(source, hub_cache), source.rsplit("/", 1)[-1]
    except AdapterSourceError as error:
        raise AdapterSourceError(f"No folder {source} exists, so it was read as a hub repo id. {error}") from error


def download_from_hub(repo_id: str, hub_cache: Path | None = None) -> Path:
    """Fetch a repo's adapter files, or find them in the Hugging Face cache when the hub is offline."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=hub_cache, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError as error:
        raise AdapterSourceError(f"Adapter repo {repo_id!r} was not found on the Hugging Face hub (or it is private "
                                 "and no token is set); check the id, or pass a local folder.") from error
    except LocalEntryNotFoundError as error:
        if constants.HF_HUB_OFFLINE:
            raise AdapterSourceError(
                f"Adapter repo {repo_id!r} is not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1). "
                f"Download it first with `hf download {repo_id}` where the hub is reachable, or pass the path of "
                "a local PEFT adapter folder.") from error
        raise AdapterSourceError(f"Could not download adapter repo {repo_id!r} from the Hugging Face hub ({error}). "
                                 "Check the connection, or pass the path of a local PEFT adapter folder.") from error
    except HfHubHTTPError as error:
        raise AdapterSourceError(f"The Hugging Face hub rejected the request for adapter repo {repo_id!r} "
                                 f"({error}).") from error


def source_adapters(folder: Path, source: str, single_id: str,
                    adapter_id: AdapterId | None = None) -> list[tuple[Path, AdapterId]]:
    """List (folder, adapter id) for each adapter of a source: the folder itself, or its adapter sub-folders."""
    if is_adapter_folder(folder):
        return [(folder, adapter_id or single_id)]
    children = adapter_folders(folder)
    if not children:
        raise AdapterSourceError(f"{source} contains no PEFT adapter: neither it nor any sub-folder has {CONFIG_FILE}.")
    if adapter_id is not None:
        raise AdapterSourceError(f"--id names one adapter, but {source} contains {len(children)}; import them without "
                                 "--id, or one adapter folder at a time.")
    return [(child, child.name) for child in children]


def import_adapters(source: str, library: Path, store: AdapterStore, encoder: Encoder,
                    module_shapes: dict[str, tuple[int, int]], adapter_id: AdapterId | None = None,
                    description: str | None = None, hub_cache: Path | None = None) -> ImportReport:
    """Validate every adapter of `source`, copy the new ones into `library` and register them.

    `adapter_id` renames a single adapter; `description` (single adapter only) is written to the
    copy's moa.json and becomes its retrieval key text. Importing the same adapter again changes
    nothing. Raises `ImportRejectedError` or `AdapterSourceError`, with nothing changed, if any
    adapter is rejected or the source cannot be read.
    """
    folder, single_id = resolve_source(source, hub_cache)
    sources = source_adapters(folder, source, single_id, adapter_id)
    if description is not None and len(sources) != 1:
        raise AdapterSourceError(f"--description applies to one adapter, but {source} contains {len(sources)}.")
    library = Path(library).resolve()
    entries = _plan(sources, library, store, encoder, module_shapes, source, description)

    report = ImportReport(source, library)
    report.unchanged = [entry.candidate.info.adapter_id for entry in entries if entry.registered]
    pending = [entry for entry in entries if not entry.registered]
    if pending:
        _copy_and_register(pending, library, store, encoder, module_shapes, source, description)
        report.imported = [entry.candidate.info.adapter_id for entry in pending]
    return report


def _plan(sources: list[tuple[Path, AdapterId]], library: Path, store: AdapterStore, encoder: Encoder,
          module_shapes: dict[str, tuple[int, int]], source: str, description: str | None) -> list[_Entry]:
    """Validate each adapter and check that its id is free; reject the whole source on any failure."""
    registered = store.adapters()
    entries, rejected = [], []
    for folder, adapter_id in sources:
        try:
            candidate = validate_folder(folder, store, encoder, module_shapes, adapter_id)
            entries.append(_entry(candidate, folder, library / adapter_id, registered.get(adapter_id), description))
        except InvalidAdapterError as error:
            rejected.append(error)
    if rejected:
        reasons = "\n".join(f"  - {error}" for error in rejected)
        raise ImportRejectedError(f"{len(rejected)} adapter(s) from {source} rejected; the library folder {library} "
                                  f"and the store were not changed:\n{reasons}")
    return entries


def _entry(candidate: Candidate, folder: Path, target: Path, record: AdapterRecord | None,
           description: str | None) -> _Entry:
    """Decide whether an adapter must be copied and registered, or reject an id that another adapter uses."""
    info = candidate.info
    in_place = target.exists() and target.resolve() == folder.resolve()
    if in_place and description is not None:
        raise InvalidAdapterError(info.adapter_id, f"it is already in the library at {target}; edit its {METADATA_FILE} "
                                                   "and run `moa index` to change its description.")
    if target.exists() and not in_place and not _same_adapter(target, folder, description):
        raise InvalidAdapterError(info.adapter_id, f"a different adapter already exists at {target}; import this one "
                                                   "under another name with --id, or delete that folder and run "
                                                   f"`moa remove {info.adapter_id}` first.")
    if record is not None and Path(record.path) != target:
        raise InvalidAdapterError(info.adapter_id, f"an adapter with this id is already registered from {record.path}; "
                                                   f"import this one with --id, or run `moa remove {info.adapter_id}` "
                                                   "first.")
    needs_copy = not target.exists()
    registered = not needs_copy and record is not None and record.fingerprint == fingerprint_folder(target)
    return _Entry(candidate, target, needs_copy, registered)


def _same_adapter(target: Path, folder: Path, description: str | None) -> bool:
    """Return whether `target` already contains what importing `folder` with `description` would put there."""
    if description is None:
        return fingerprint_folder(target) == fingerprint_folder(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (target / name).is_file() or not filecmp.cmp(target / name, folder / name, shallow=False):
            return False
    metadata_path = target / METADATA_FILE
    metadata = json.loads(metadata_path.read_text(encoding="utf-8")) if metadata_path.is_file() else {}
    return metadata.get("description") == description


def _copy_and_register(entries: list[_Entry], library: Path, store: AdapterStore, encoder: Encoder,
                       module_shapes: dict[str, tuple[int, int]], source: str, description: str | None) -> None:
    """Stage the copies, validate them again, rename them into the library, then register them."""
    library.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=library))
    moved: list[Path] = []
    try:
        final = []
        for entry in entries:
            info = entry.candidate.info
            if not entry.needs_copy:  # already in the library with the same files; register that folder
                final.append(dataclasses.replace(entry.candidate, info=dataclasses.replace(info, path=entry.target)))
                continue
            staged = _stage_copy(info.path, staging / info.adapter_id, description)
            try:  # the source may have changed since it was validated
                checked = validate_folder(staged, store, encoder, module_shapes, info.adapter_id)
            except InvalidAdapterError as error:
                raise ImportRejectedError(f"{error} (in the copy of {source}); the library folder {library} and "
                                          "the store were not changed.") from error
            final.append(dataclasses.replace(checked, info=dataclasses.replace(checked.info, path=entry.target)))
        for entry in entries:
            if entry.needs_copy:
                # atomic within one file system; it fails if a non-empty folder has taken the name meanwhile
                os.rename(staging / entry.candidate.info.adapter_id, entry.target)
                moved.append(entry.target)
        store.register([(candidate.info, candidate.keys) for candidate in final])
    except BaseException:
        for target in moved:
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Imported %d adapter(s) from %s into %s", len(entries), source, library)


def _stage_copy(folder: Path, staged: Path, description: str | None) -> Path:
    """Copy an adapter's files (following the hub cache's symlinks) and write `description` into its moa.json."""
    staged.mkdir()
    for name in COPIED_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, staged / name)
    if description is not None:
        metadata_path = staged / METADATA_FILE
        metadata = json.loads(metadata_path.read_text(encoding="utf-8")) if metadata_path.is_file() else {}
        metadata["description"] = description
        metadata_path.write_text(json.dumps(metadata, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return staged
