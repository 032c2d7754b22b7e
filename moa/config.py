"""Settings for MoA: where things live (`MoAConfig`) and how one query is routed (`RouteSettings`).

`MoAConfig` is read from, in increasing priority: the defaults below, a TOML file
(`$MOA_CONFIG`, else `./moa.toml`, else `~/.config/moa/config.toml`), `MOA_*` environment
variables, and explicit keyword arguments (the command line's options).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent

WEIGHTINGS = ("softmax", "normalized", "uniform")
ERROR_METRICS = ("surprisal", "entropy", "nll")
EXECUTION_PATHS = ("auto", "unmerged", "merged")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the setting and the fix."""


def _default_home() -> Path:
    return Path(os.environ.get("MOA_HOME", Path.home() / ".cache" / "moa"))


@dataclass
class MoAConfig:
    """Locations and models shared by every query of one MoA process."""

    base_model: str = "default"
    """Causal LM: a Hugging Face id, a local folder, a `.gguf` file, or "default" (bundled SmolLM2)."""
    encoder: str = "default"
    """Retriever encoder: a Hugging Face id or folder, or "default" (bundled all-MiniLM-L6-v2)."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""
    dtype: str = "auto"
    """"auto" (bf16 on CUDA, fp32 on CPU), "float32", "bfloat16" or "float16"."""
    home: Path = field(default_factory=_default_home)
    """Folder for the model cache and the default local store."""
    store_path: Path | None = None
    """Chroma persistent store folder; defaults to `home/store`."""
    model_cache: Path | None = None
    """Folder of dequantized model weights; defaults to `home/models`."""
    chroma_url: str | None = None
    """URL of a Chroma server (`chroma run`); when set, `store_path` is not used."""
    adapters_dir: Path = REPO_ROOT / "adapters"
    """Adapter library indexed on first run when the store is empty."""
    retriever_head: Path | None = None
    """Trained query-side retriever head; None uses the one shipped in the repo if present."""
    max_query_chars: int = 4000
    """Longest accepted query, in characters."""
    max_prompt_tokens: int = 512
    """Longest accepted prompt after the chat template, in tokens."""
    max_new_tokens_limit: int = 512
    """Upper bound on `max_new_tokens` for any request."""
    adapter_cache_size: int = 64
    """How many adapters' tensors the LRU cache keeps in memory."""

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser()
        self.adapters_dir = Path(self.adapters_dir).expanduser()
        if self.store_path is None:
            self.store_path = self.home / "store"
        self.store_path = Path(self.store_path).expanduser()
        self.model_cache = Path(self.model_cache or self.home / "models").expanduser()
        if self.retriever_head is not None:
            self.retriever_head = Path(self.retriever_head).expanduser()
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}.")
        for name in ("max_query_chars", "max_prompt_tokens", "max_new_tokens_limit", "adapter_cache_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")

    @property
    def model_cache_dir(self) -> Path:
        return self.model_cache

    @classmethod
    def load(cls, **overrides: Any) -> MoAConfig:
        """Build the config from the file, the environment and `overrides` (None values are ignored)."""
        values: dict[str, Any] = {}
        values.update(_read_config_file())
        values.update(_read_environment())
        values.update({key: value for key, value in overrides.items() if value is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown setting(s) {unknown}; valid settings are {sorted(known)}.")
        return cls(**values)


_ENVIRONMENT_VARIABLES = {
    "MOA_BASE_MODEL": "base_model",
    "MOA_ENCODER": "encoder",
    "MOA_DEVICE": "device",
    "MOA_DTYPE": "dtype",
    "MOA_STORE": "store_path",
    "MOA_MODEL_CACHE": "model_cache",
    "MOA_CHROMA_URL": "chroma_url",
    "MOA_ADAPTERS": "adapters_dir",
    "MOA_RETRIEVER_HEAD": "retriever_head",
    "MOA_MAX_QUERY_CHARS": "max_query_chars",
    "MOA_MAX_PROMPT_TOKENS": "max_prompt_tokens",
    "MOA_MAX_NEW_TOKENS_LIMIT": "max_new_tokens_limit",
}
_INTEGER_SETTINGS = {"max_query_chars", "max_prompt_tokens", "max_new_tokens_limit", "adapter_cache_size"}


def _read_environment() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for variable, name in _ENVIRONMENT_VARIABLES.items():
        raw = os.environ.get(variable)
        if raw is None or raw == "":
            continue
        if name in _INTEGER_SETTINGS:
            try:
                values[name] = int(raw)
            except ValueError:
                raise ConfigError(f"{variable} must be an integer, got {raw!r}.") from None
        else:
            values[name] = raw
    return values


def config_file_path() -> Path | None:
    """Return the config file in use, or None when there is none."""
    explicit = os.environ.get("MOA_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"MOA_CONFIG points to {path}, which is not a file.")
        return path
    for candidate in (Path("moa.toml"), Path.home() / ".config" / "moa" / "config.toml"):
        if candidate.is_file():
            return candidate
    return None


def _read_config_file() -> dict[str, Any]:
    path = config_file_path()
    if path is None:
        return {}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"Config file {path} is not valid TOML: {error}") from error
    return data.get("moa", data)


@dataclass
class RouteSettings:
    """Per-request settings: routing, merging, generation, scoring and refinement of one query."""

    top_k: int = 3
    """How many adapters to retrieve in the first iteration."""
    temperature: float = 0.1
    """Softmax temperature turning similarities into merge weights (lower is sharper)."""
    weighting: str = "softmax"
    """softmax(similarity / temperature), "normalized" (similarities divided by their sum) or "uniform"."""
    min_similarity: float = 0.0
    """Adapters less similar than this are not used; if none is left the base model answers alone."""
    merge_method: str = "exact"
    """"exact" (sum of w·(α/r)·BA, no cross terms) or a PEFT combination type (see `moa.merging`)."""
    density: float = 0.5
    """Fraction of values kept by the ties, dare and magnitude_prune merge methods."""
    error_metric: str = "auto"
    """"surprisal", "entropy", "nll" (needs a reference) or "auto" (nll with a reference, else surprisal)."""
    threshold: float = 2.0
    """Mean per-token error (nats) below which an answer is accepted."""
    max_iterations: int = 3
    """Upper bound on retrieve-generate-check rounds."""
    strategy: str = "chain"
    """Refinement strategy name registered in `moa.refinement.STRATEGIES`."""
    max_new_tokens: int = 64
    """Tokens to generate per iteration."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    sampling_temperature: float = 0.7
    """Temperature of the sampling distribution (only with `do_sample`)."""
    top_p: float = 0.9
    """Nucleus mass kept when sampling."""
    seed: int = 0
    """Seed of the sampling generator, so a sampled answer can be reproduced."""
    execution_path: str = "auto"
    """"unmerged" (LoRA beside frozen weights), "merged" (deltas added into the weights) or "auto"."""
    contributions: bool = True
    """Compute each adapter's leave-one-out and alone error contribution."""
    use_trained_retriever: bool = True
    """Use the trained query head when one is loaded; False uses the plain encoder."""

    def __post_init__(self) -> None:
        _check_range("top_k", self.top_k, 1, 64)
        _check_range("max_iterations", self.max_iterations, 1, 20)
        _check_range("max_new_tokens", self.max_new_tokens, 1, 4096)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}.")
        if self.sampling_temperature <= 0:
            raise ConfigError(f"sampling_temperature must be > 0, got {self.sampling_temperature}.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0 < self.density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {self.density}.")
        if not -1 <= self.min_similarity <= 1:
            raise ConfigError(f"min_similarity must be in [-1, 1], got {self.min_similarity}.")
        if self.threshold < 0:
            raise ConfigError(f"threshold must be >= 0, got {self.threshold}.")
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("error_metric", self.error_metric, ERROR_METRICS + ("auto",))
        _check_choice("execution_path", self.execution_path, EXECUTION_PATHS)

    def replace(self, **changes: Any) -> RouteSettings:
        return dataclasses.replace(self, **changes)


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}.")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
