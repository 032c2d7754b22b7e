"""The adapter store: one Chroma collection of adapter keys per (base model, encoder) pair.

Each adapter has one or more key vectors, stored as records `<adapter id>#<n>` that all carry
the adapter's metadata. A trained expert has one key (see `moa.training`); an adapter without
precomputed keys gets its description and sample queries embedded. A query returns adapters,
not records: similarities are aggregated per adapter by their maximum.
Relevance is cosine similarity, 1 − cosine distance clamped to [−1, 1].
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import chromadb
import httpx
import numpy as np
import torch
from chromadb.config import Settings

from .adapters import AdapterId, AdapterInfo

logger = logging.getLogger(__name__)

_JSON_FIELDS_KEY = "_json_fields"
LOCK_TIMEOUT_SECONDS = 10.0
SERVER_TIMEOUT_SECONDS = 5.0
"""How long start-up waits for each response of a Chroma server before it reports the server unreachable."""


class StoreError(RuntimeError):
    """The store cannot be reached, is locked, or holds inconsistent data."""


@dataclass
class AdapterRecord:
    """An adapter as registered in the store."""

    adapter_id: AdapterId
    path: str
    name: str
    description: str
    domain: str
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    use_rslora: bool
    fingerprint: str
    num_keys: int


@dataclass
class Retrieved:
    """One retrieved adapter with its relevance (the best similarity among its keys)."""

    record: AdapterRecord
    similarity: float

    @property
    def adapter_id(self) -> AdapterId:
        return self.record.adapter_id


@dataclass
class IndexReport:
    """Changes made by `index_folder`: the adapter ids of each outcome."""

    added: list[AdapterId] = field(default_factory=list)
    updated: list[AdapterId] = field(default_factory=list)
    removed: list[AdapterId] = field(default_factory=list)
    unchanged: list[AdapterId] = field(default_factory=list)


def collection_name(model_id: str, encoder_id: str) -> str:
    """Name the collection after both models, because keys from another encoder are meaningless here."""
    digest = hashlib.sha1(f"{model_id}\n{encoder_id}".encode()).hexdigest()[:12]
    return f"moa-{digest}"


def _encode_metadata(values: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """Serialise what Chroma cannot hold as a scalar (lists, dicts, None) as JSON, remembering which keys."""
    encoded: dict[str, str | int | float | bool] = {}
    json_fields = []
    for key, value in values.items():
        if isinstance(value, (str, int, float, bool)) and value is not None:
            encoded[key] = value
        else:
            encoded[key] = json.dumps(value)
            json_fields.append(key)
    encoded[_JSON_FIELDS_KEY] = ",".join(json_fields)
    return encoded


def _decode_metadata(values: dict[str, Any]) -> dict[str, Any]:
    json_fields = [key for key in str(values.get(_JSON_FIELDS_KEY, "")).split(",") if key]
    decoded = {key: value for key, value in values.items() if key != _JSON_FIELDS_KEY}
    for key in json_fields:
        decoded[key] = json.loads(decoded[key])
    return decoded


def _record_metadata(info: AdapterInfo, num_keys: int) -> dict[str, Any]:
    return {
        "adapter_id": info.adapter_id,
        "path": str(info.path),
        "name": info.name,
        "description": info.description,
        "domain": info.domain,
        "base_model": info.base_model,
        "rank": info.rank,
        "alpha": info.alpha,
        "target_modules": info.target_modules,
        "use_rslora": info.use_rslora,
        "fingerprint": info.fingerprint,
        "num_keys": num_keys,
    }


def _record_from_metadata(metadata: dict[str, Any]) -> AdapterRecord:
    values = _decode_metadata(metadata)
    return AdapterRecord(**{name: values[name] for name in AdapterRecord.__dataclass_fields__})


def make_client(store_path: Path | None = None, chroma_url: str | None = None) -> chromadb.api.ClientAPI:
    """Open a local persistent store, or connect to a Chroma server when `chroma_url` is set."""
    settings = Settings(anonymized_telemetry=False)
    if chroma_url:
        return _connect_server(chroma_url, settings)
    if store_path is None:
        raise StoreError("Either a store path or a Chroma server URL is required.")
    store_path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(store_path), settings=settings)


def _connect_server(chroma_url: str, settings: Settings) -> chromadb.api.ClientAPI:
    """Check the server's heartbeat and version first, because chromadb's own client waits without a timeout."""
    parsed = urlparse(chroma_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/"):
        raise StoreError(f"Invalid Chroma server URL {chroma_url!r}; expected http://HOST:PORT.")
    version = check_server(chroma_url)
    try:
        client = chromadb.HttpClient(host=parsed.hostname, port=parsed.port or 8000,
                                     ssl=parsed.scheme == "https", settings=settings)
    except Exception as error:  # chromadb raises ValueError, ChromaError or httpx errors here
        raise StoreError(f"Cannot use the Chroma server at {chroma_url}: {error}. {_server_fix()}") from error
    logger.info("Connected to the Chroma server at %s (version %s)", chroma_url, version)
    return client


def _server_fix() -> str:
    return (f"Start one with `chroma run --path DIR --port PORT` from chromadb {chromadb.__version__}, "
            "or unset MOA_CHROMA_URL and --chroma-url to use a local store.")


def check_server(chroma_url: str) -> str:
    """Return the version a Chroma server reports; raise `StoreError` if it is unreachable or incompatible."""
    base = chroma_url.rstrip("/")
    try:
        with httpx.Client(timeout=SERVER_TIMEOUT_SECONDS) as http:
            heartbeat = http.get(f"{base}/api/v2/heartbeat")
            if heartbeat.status_code in (404, 410):  # a server older than the v2 API
                version = http.get(f"{base}/api/v1/version").raise_for_status().json()
            else:
                heartbeat.raise_for_status()
                version = http.get(f"{base}/api/v2/version").raise_for_status().json()
    except httpx.TimeoutException:
        raise StoreError(f"The Chroma server at {chroma_url} did not respond within {SERVER_TIMEOUT_SECONDS:.0f} s. "
                         f"{_server_fix()}") from None
    except httpx.TransportError as error:
        raise StoreError(f"Cannot reach the Chroma server at {chroma_url} ({error}). {_server_fix()}") from error
    except (httpx.HTTPStatusError, ValueError) as error:  # ValueError: the body is not JSON
        raise StoreError(f"{chroma_url} returned a response that is not from a Chroma server ({error}). "
                         f"{_server_fix()}") from error

    server_major = str(version).split(".", 1)[0]
    client_major = chromadb.__version__.split(".", 1)[0]
    if server_major != client_major:
        raise StoreError(f"The Chroma server at {chroma_url} runs version {version}, but this client is chromadb "
                         f"{chromadb.__version__}, and different major versions are incompatible. Run a chromadb "
                         f"{client_major}.x server (`chroma run --path DIR --port PORT` from this environment), "
                         f"or connect to a local store instead.")
    return str(version)


class AdapterStore:
    """Registers, lists, removes and retrieves adapters by key similarity."""

    def __init__(self, client: chromadb.api.ClientAPI, model_id: str, encoder_id: str,
                 lock_path: Path | None = None) -> None:
        self.client = client
        self.model_id = model_id
        self.encoder_id = encoder_id
        self.lock_path = lock_path
        self.collection = client.get_or_create_collection(
            collection_name(model_id, encoder_id),
            embedding_function=None,  # keys come from MoA's encoder only; no default model download
            configuration={"hnsw": {"space": "cosine"}},
            metadata={"base_model": model_id, "encoder": encoder_id},
        )

    @classmethod
    def open(cls, model_id: str, encoder_id: str, store_path: Path | None = None,
             chroma_url: str | None = None) -> AdapterStore:
        client = make_client(store_path, chroma_url)
        lock_path = None if chroma_url else Path(store_path) / "moa.lock"
        return cls(client, model_id, encoder_id, lock_path)

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold an exclusive file lock on a local store while writing, so two processes never interleave."""
        if self.lock_path is None:
            yield
            return
        with open(self.lock_path, "a+") as handle:
            deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(f"The store at {self.lock_path.parent} is locked by another MoA process "
                                         f"(waited {LOCK_TIMEOUT_SECONDS:.0f} s); retry when it finishes.") from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def count(self) -> int:
        """Return the number of registered adapters, from their first key records' ids alone (no metadata)."""
        return len(self.collection.get(where={"key_index": 0}, include=[])["ids"])

    def adapters(self) -> dict[AdapterId, AdapterRecord]:
        """Return every registered adapter, keyed by id."""
        result = self.collection.get(where={"key_index": 0}, include=["metadatas"])
        records = [_record_from_metadata(metadata) for metadata in result["metadatas"] or []]
        return {record.adapter_id: record for record in sorted(records, key=lambda r: r.adapter_id)}

    def key_counts(self) -> dict[AdapterId, int]:
        """Return how many key records each adapter has, to find adapters left incomplete by a crash."""
        counts: dict[AdapterId, int] = {}
        for metadata in self.collection.get(include=["metadatas"])["metadatas"] or []:
            counts[metadata["adapter_id"]] = counts.get(metadata["adapter_id"], 0) + 1
        return counts

    def keys(self) -> tuple[list[AdapterId], torch.Tensor]:
        """Return every key vector with its adapter id, for maps and analysis. -> ids, (num_keys, dim)."""
        result = self.collection.get(include=["embeddings", "metadatas"])
        ids = [metadata["adapter_id"] for metadata in result["metadatas"] or []]
        embeddings = result["embeddings"]
        vectors = torch.tensor(embeddings, dtype=torch.float32) if embeddings is not None and len(embeddings) else torch.empty(0)
        return ids, vectors

    def register(self, entries: Sequence[tuple[AdapterInfo, torch.Tensor]]) -> None:
        """Add or replace adapters, each with its keys (num_keys, dim). The caller has validated them."""
        for info, keys in entries:
            if keys.ndim != 2 or keys.shape[0] == 0:
                raise StoreError(f"Adapter {info.adapter_id!r}: expected keys of shape (num_keys, dim), got {tuple(keys.shape)}.")
        ids, metadatas = [], []
        for info, keys in entries:
            base = _record_metadata(info, keys.shape[0])
            for index in range(keys.shape[0]):
                ids.append(f"{info.adapter_id}#{index}")
                metadatas.append(_encode_metadata({**base, "key_index": index}))
        # one float32 array rather than lists of Python floats, which took 32 bytes per value
        embeddings = torch.cat([keys.float() for _, keys in entries]).numpy()  # (num_records, dim)
        with self.write_lock():
            self._delete_adapters([info.adapter_id for info, _ in entries])
            self._add_in_batches(ids, embeddings, metadatas)
        logger.info("Registered %d adapter(s) with %d key(s)", len(entries), len(ids))

    def _add_in_batches(self, ids: list[str], embeddings: np.ndarray, metadatas: list[dict]) -> None:
        batch_size = self.client.get_max_batch_size()
        for start in range(0, len(ids), batch_size):
            end = start + batch_size
            self.collection.add(ids=ids[start:end], embeddings=embeddings[start:end], metadatas=metadatas[start:end])

    def _delete_adapters(self, adapter_ids: Sequence[AdapterId]) -> None:
        for start in range(0, len(adapter_ids), 100):
            chunk = list(adapter_ids[start:start + 100])
            self.collection.delete(where={"adapter_id": {"$in": chunk}})

    def delete_records(self, adapter_ids: Sequence[AdapterId]) -> None:
        """Delete every key record of these adapters, registered or not (crash clean-up)."""
        with self.write_lock():
            self._delete_adapters(list(adapter_ids))

    def remove(self, adapter_ids: Sequence[AdapterId]) -> None:
        """Unregister adapters; an id that is not registered raises `KeyError` before anything is deleted."""
        registered = self.adapters()
        missing = [adapter_id for adapter_id in adapter_ids if adapter_id not in registered]
        if missing:
            raise KeyError(f"Not registered: {', '.join(missing)}. `moa list` shows the registered adapters.")
        with self.write_lock():
            self._delete_adapters(list(adapter_ids))

    def query(self, query_embedding: torch.Tensor, top_k: int) -> list[Retrieved]:
        """Return the `top_k` adapters whose best key is most similar to `query_embedding` (dim,)."""
        total = self.collection.count()
        if total == 0:
            return []
        n_results = min(total, max(4 * top_k, 16))
        while True:
            result = self.collection.query(query_embeddings=[query_embedding.float().tolist()],
                                           n_results=n_results, include=["distances", "metadatas"])
            best = self._aggregate(result["metadatas"][0], result["distances"][0])
            if len(best) >= top_k or n_results >= total:
                break
            n_results = min(total, n_results * 4)  # adapters with many keys crowded out others; look further
        ranked = sorted(best.values(), key=lambda item: item.similarity, reverse=True)
        return ranked[:top_k]

    @staticmethod
    def _aggregate(metadatas: list[dict], distances: list[float]) -> dict[AdapterId, Retrieved]:
        best: dict[AdapterId, Retrieved] = {}
        for metadata, distance in zip(metadatas, distances):
            similarity = max(-1.0, min(1.0, 1.0 - float(distance)))
            adapter_id = metadata["adapter_id"]
            if adapter_id not in best or similarity > best[adapter_id].similarity:
                best[adapter_id] = Retrieved(_record_from_metadata(metadata), similarity)
        return best
