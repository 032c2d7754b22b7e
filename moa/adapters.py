"""PEFT LoRA adapter folders: reading, validation against the base model, and an LRU tensor cache.

An adapter folder is a standard PEFT folder (`adapter_config.json`, `adapter_model.safetensors`)
that MoA may extend with `moa.json` (name, description, domain, sample queries) and
`keys.safetensors` (precomputed retrieval keys and the encoder that made them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

AdapterId = str

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "moa.json"
KEYS_FILE = "keys.safetensors"

UNSUPPORTED_VARIANTS = {
    "use_dora": "DoRA adapters rescale the merged weight by a magnitude vector, which a weighted LoRA sum "
                "cannot reproduce.",
    "alora_invocation_tokens": "Activated LoRA applies its update only from the invocation tokens on, which a "
                               "merged weight cannot do.",
    "use_qalora": "QA-LoRA feeds the adapter group-pooled inputs, so scaling * B @ A is not its weight update.",
    "use_bdlora": "BD-LoRA stores block-diagonal factors, which MoA does not read.",
    "kasa_config": "KaSA inserts a learned diagonal between A and B and truncates the base weight by SVD.",
    "arrow_config": "Arrow routes between adapters itself, per token.",
    "monteclora_config": "MonteCLoRA samples its adapter weights at run time.",
    "fan_in_fan_out": "the weights are stored transposed for Conv1D layers; MoA merges into nn.Linear layers only.",
    "lora_bias": "a bias on lora_B adds a term that scaling * B @ A does not contain.",
    "target_parameters": "LoRA on raw parameters rather than Linear modules is not supported.",
    "trainable_token_indices": "trained embedding rows are not a LoRA delta.",
}
"""PEFT LoraConfig fields (PEFT 0.21) whose merge MoA would compute wrongly, with the reason shown on rejection.

rsLoRA (`use_rslora`) is not here because `AdapterInfo.scaling` applies its alpha / sqrt(r) exactly.
"""

_ADAPTER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY_PATTERN = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


class InvalidAdapterError(ValueError):
    """An adapter failed validation; the message names the adapter and the reason."""

    def __init__(self, adapter: str, reason: str) -> None:
        super().__init__(f"Adapter {adapter!r} rejected: {reason}")
        self.adapter = adapter
        self.reason = reason


@dataclass
class LoRAModule:
    """One target module's low-rank update ΔW = scaling · B @ A."""

    A: torch.Tensor  # (rank, in_features)
    B: torch.Tensor  # (out_features, rank)
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B.float() @ self.A.float())  # (out, in)


@dataclass
class LoRAWeights:
    """All of one adapter's LoRA modules, keyed by the base model's module name."""

    adapter_id: AdapterId
    modules: dict[str, LoRAModule]

    def to(self, device: torch.device, dtype: torch.dtype) -> LoRAWeights:
        moved = {name: LoRAModule(m.A.to(device, dtype), m.B.to(device, dtype), m.scaling)
                 for name, m in self.modules.items()}
        return LoRAWeights(self.adapter_id, moved)


@dataclass
class AdapterInfo:
    """Everything the store records about one adapter folder."""

    adapter_id: AdapterId
    path: Path
    name: str
    description: str
    domain: str
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    use_rslora: bool
    fingerprint: str
    sample_queries: list[str] = field(default_factory=list)
    keys: torch.Tensor | None = None  # (num_keys, dim), precomputed by `keys_encoder`
    keys_encoder: str | None = None
    raw_target_modules: object = None
    """`target_modules` exactly as in adapter_config.json: a list of names or a regular expression."""

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    def key_texts(self) -> list[str]:
        """Texts to embed as keys when no precomputed keys fit the encoder."""
        texts = [f"{self.name}: {self.description}".strip(": ")] + list(self.sample_queries)
        return [text for text in texts if text]


def is_adapter_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def fingerprint_folder(path: Path) -> str:
    """Hash the files that define an adapter, so `moa index` can tell a changed adapter from an unchanged one."""
    digest = hashlib.sha256()
    for file_name in (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE, KEYS_FILE):
        file_path = path / file_name
        if file_path.is_file():
            digest.update(file_name.encode())
            digest.update(file_path.read_bytes())
    return digest.hexdigest()[:32]


def _read_json(path: Path, adapter: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidAdapterError(adapter, f"{path.name} is missing in {path.parent}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidAdapterError(adapter, f"{path.name} is not valid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise InvalidAdapterError(adapter, f"{path.name} must hold a JSON object, got {type(data).__name__}.")
    return data


def _target_module_matcher(value: object, adapter: str):
    """Return a predicate over full module names for PEFT's `target_modules`.

    PEFT accepts a list of names, each matching a module whose name equals it or ends with
    ".<name>", or one string that must match the whole module name as a regular expression.
    Anything else (mixed types, an empty list, an invalid pattern) is rejected.
    """
    if isinstance(value, str):
        try:
            pattern = re.compile(value)
        except re.error as error:
            raise InvalidAdapterError(adapter, f"target_modules {value!r} is not a valid regular expression ({error}).") from error
        return lambda name: pattern.fullmatch(name) is not None
    if isinstance(value, list) and value and all(isinstance(item, str) and item for item in value):
        names = set(value)
        return lambda name: name in names or any(name.endswith("." + item) for item in names)
    raise InvalidAdapterError(adapter, f"target_modules must be a list of module names or one regular expression, "
                                       f"got {value!r}.")


def read_adapter_config(path: Path, adapter_id: AdapterId) -> dict:
    """Read `adapter_config.json` and reject variants whose merge MoA would compute wrongly."""
    config = _read_json(path / CONFIG_FILE, adapter_id)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapterError(adapter_id, f"peft_type is {peft_type!r}; only LoRA adapters (\"LORA\") are supported.")
    for variant_field, reason in UNSUPPORTED_VARIANTS.items():
        if config.get(variant_field):
            raise InvalidAdapterError(adapter_id, f"{variant_field}={config[variant_field]!r}: {reason}")
    for pattern_field in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern_field):
            raise InvalidAdapterError(adapter_id, f"{pattern_field} is set; per-module ranks or alphas are not supported.")
    for bad_field in ("layers_to_transform", "modules_to_save"):
        if config.get(bad_field):
            raise InvalidAdapterError(adapter_id, f"{bad_field} is set; MoA merges LoRA deltas only.")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidAdapterError(adapter_id, f"r must be a positive integer, got {rank!r}.")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise InvalidAdapterError(adapter_id, f"lora_alpha must be a positive number, got {alpha!r}.")
    return config


def read_adapter(path: Path, adapter_id: AdapterId | None = None) -> AdapterInfo:
    """Read an adapter folder's config, MoA metadata and precomputed keys (weights are read by `load_lora_weights`)."""
    path = Path(path).resolve()
    adapter_id = adapter_id or path.name
    if not _ADAPTER_ID_PATTERN.match(adapter_id):
        raise InvalidAdapterError(adapter_id, "adapter ids must be 1-128 letters, digits, '.', '_' or '-', "
                                              "starting with a letter or digit; rename the folder.")
    config = read_adapter_config(path, adapter_id)
    metadata = _read_json(path / METADATA_FILE, adapter_id) if (path / METADATA_FILE).is_file() else {}
    keys, keys_encoder = _read_keys(path, adapter_id)
    _target_module_matcher(config.get("target_modules"), adapter_id)  # reject unusable forms early
    info = AdapterInfo(
        adapter_id=adapter_id,
        path=path,
        name=str(metadata.get("name", adapter_id)),
        description=str(metadata.get("description", "")),
        domain=str(metadata.get("domain", "")),
        base_model=str(config.get("base_model_name_or_path") or ""),
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        target_modules=[],  # filled from the weights below, as short module names
        use_rslora=bool(config.get("use_rslora", False)),
        fingerprint=fingerprint_folder(path),
        sample_queries=[str(query) for query in metadata.get("sample_queries", [])],
        keys=keys,
        keys_encoder=keys_encoder,
        raw_target_modules=config.get("target_modules"),
    )
    info.target_modules = sorted({name.rsplit(".", 1)[-1] for name in _weight_module_names(path, adapter_id)})
    return info


def _weight_module_names(path: Path, adapter_id: AdapterId) -> set[str]:
    """Module names that the weights file has LoRA factors for, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as handle:
            keys = list(handle.keys())
    except FileNotFoundError:
        raise InvalidAdapterError(adapter_id, f"{WEIGHTS_FILE} is missing in {path}.") from None
    except (SafetensorError, OSError) as error:
        raise InvalidAdapterError(adapter_id, f"{WEIGHTS_FILE} is corrupt or unreadable ({error}).") from error
    return {match["module"] for match in map(_KEY_PATTERN.match, keys) if match}


def _read_keys(path: Path, adapter_id: AdapterId) -> tuple[torch.Tensor | None, str | None]:
    keys_path = path / KEYS_FILE
    if not keys_path.is_file():
        return None, None
    try:
        from safetensors import safe_open

        with safe_open(str(keys_path), framework="pt") as handle:
            encoder = (handle.metadata() or {}).get("encoder")
            keys = handle.get_tensor("keys").float()
    except (SafetensorError, OSError, KeyError) as error:
        raise InvalidAdapterError(adapter_id, f"{KEYS_FILE} is unreadable ({error}).") from error
    if keys.ndim != 2 or keys.shape[0] == 0 or not torch.isfinite(keys).all():
        raise InvalidAdapterError(adapter_id, f"{KEYS_FILE} must hold a finite (num_keys, dim) tensor 'keys'.")
    return keys, encoder


def save_keys(path: Path, keys: torch.Tensor, encoder_id: str) -> None:
    from safetensors.torch import save_file

    save_file({"keys": keys.float().contiguous()}, str(path / KEYS_FILE), metadata={"encoder": encoder_id})


def load_lora_weights(info: AdapterInfo) -> LoRAWeights:
    """Load an adapter's LoRA tensors as float32 on CPU, keyed by the base model's module names."""
    try:
        tensors = load_file(str(info.path / WEIGHTS_FILE))
    except FileNotFoundError:
        raise InvalidAdapterError(info.adapter_id, f"{WEIGHTS_FILE} is missing in {info.path}.") from None
    except (SafetensorError, OSError) as error:
        raise InvalidAdapterError(info.adapter_id, f"{WEIGHTS_FILE} is corrupt or unreadable ({error}).") from error

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    source_keys: dict[tuple[str, str], str] = {}  # (module, side) -> the tensor name it was read from
    for key, tensor in tensors.items():
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise InvalidAdapterError(info.adapter_id, f"unexpected tensor {key!r}; only lora_A/lora_B weights are "
                                                       "supported (no DoRA magnitudes, embeddings or biases).")
        slot = (match["module"], match["side"])
        if slot in source_keys:  # e.g. "base_model.model.X.lora_A.weight" beside "X.lora_A.default.weight"
            raise InvalidAdapterError(info.adapter_id, f"tensors {source_keys[slot]!r} and {key!r} are both lora_"
                                                       f"{slot[1]} of module {slot[0]!r}; keep one naming form.")
        source_keys[slot] = key
        pairs.setdefault(match["module"], {})[match["side"]] = tensor.float()

    modules = {}
    for module_name, sides in pairs.items():
        if set(sides) != {"A", "B"}:
            raise InvalidAdapterError(info.adapter_id, f"module {module_name!r} has lora_{''.join(sides)} only.")
        modules[module_name] = LoRAModule(sides["A"], sides["B"], info.scaling)
    if not modules:
        raise InvalidAdapterError(info.adapter_id, f"{WEIGHTS_FILE} contains no LoRA tensors.")
    return LoRAWeights(info.adapter_id, modules)


def base_model_matches(adapter_base: str, model_id: str) -> bool:
    """Compare base model names by their last path component, case-insensitively.

    A local copy of `HuggingFaceTB/SmolLM2-135M-Instruct` in `./SmolLM2-135M-Instruct` matches it.
    """
    def last_component(name: str) -> str:
        return name.rstrip("/").rsplit("/", 1)[-1].lower()

    return bool(adapter_base) and last_component(adapter_base) == last_component(model_id)


def validate_adapter(info: AdapterInfo, weights: LoRAWeights, model_id: str,
                     module_shapes: dict[str, tuple[int, int]]) -> None:
    """Check that an adapter can be merged into `model_id`; raise `InvalidAdapterError` with the reason otherwise."""
    if not base_model_matches(info.base_model, model_id):
        raise InvalidAdapterError(info.adapter_id, f"it was trained for base model {info.base_model!r}, "
                                                   f"but this store serves {model_id!r}.")
    matches_target = _target_module_matcher(info.raw_target_modules, info.adapter_id)
    for module_name, module in weights.modules.items():
        if module_name not in module_shapes:
            raise InvalidAdapterError(info.adapter_id, f"module {module_name!r} is not a Linear layer of {model_id!r}.")
        if not matches_target(module_name):
            raise InvalidAdapterError(info.adapter_id, f"module {module_name!r} does not match target_modules "
                                                       f"{info.raw_target_modules!r}; the config and weights disagree.")
        in_features, out_features = module_shapes[module_name]
        expected_a, expected_b = (info.rank, in_features), (out_features, info.rank)
        if tuple(module.A.shape) != expected_a or tuple(module.B.shape) != expected_b:
            raise InvalidAdapterError(
                info.adapter_id,
                f"shapes of {module_name!r} do not fit the base model: lora_A {tuple(module.A.shape)} "
                f"(expected {expected_a}), lora_B {tuple(module.B.shape)} (expected {expected_b}).",
            )
        if not (torch.isfinite(module.A).all() and torch.isfinite(module.B).all()):
            raise InvalidAdapterError(info.adapter_id, f"module {module_name!r} contains NaN or infinite weights.")


class AdapterCache:
    """LRU cache of adapters' LoRA tensors on the model's device, so a warm switch reads no file.

    Entries are keyed by (adapter id, fingerprint), so an adapter changed on disk and re-indexed is
    reloaded rather than served stale.
    """

    def __init__(self, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.capacity = capacity
        self.device = device
        self.dtype = dtype
        self._entries: OrderedDict[tuple[str, str], LoRAWeights] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, info: AdapterInfo) -> LoRAWeights:
        key = (info.adapter_id, info.fingerprint)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
        weights = load_lora_weights(info).to(self.device, self.dtype)
        with self._lock:
            self.misses += 1
            self._entries[key] = weights
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return weights

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
