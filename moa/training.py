"""Segmented fine-tuning: one LoRA expert per corpus segment, resumable, written as PEFT folders.

Each expert folder contains `adapter_config.json`, `adapter_model.safetensors` (fp16), a model
card `README.md`, `moa.json` (name, domain, description, sample queries, validation NLL) and
`keys.safetensors` (the expert's key, embedded by the retriever's encoder), so `moa index`
registers it without recomputing anything.

The key is one vector, the normalised sum of two unit centroids over the segment's first 512
training pairs: one of the prompts alone (how the expert's questions are asked) and one of prompt
and response together (what the expert answers). The answers name the domain where the question
does not: "What is photosynthesis?" does not mention plants, but its gloss does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from tqdm import tqdm

from .adapters import CONFIG_FILE, KEYS_FILE, METADATA_FILE, WEIGHTS_FILE, save_keys
from .encoder import Encoder
from .error import sequence_nll
from .models import BaseModel

logger = logging.getLogger(__name__)

LOSS_LOG_FILE = "loss_log.csv"
KEY_EXAMPLES = 512  # training pairs, in corpus order, that build an expert's key
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainingConfig:
    """Hyperparameters of one LoRA expert."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Short names of the Linear modules that get a LoRA."""
    steps: int = 48
    """Optimizer steps per expert."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay)."""
    batch_size: int = 8
    """Sequences per step."""
    max_length: int = 96
    """Maximum training sequence length in tokens, chat template included; longer ones are truncated."""
    warmup_steps: int = 5
    """Steps of linear learning-rate warm-up."""
    checkpoint_every: int = 20
    """Steps between resumable checkpoints."""
    validation_examples: int = 64
    """Validation pairs used for the before/after NLL of each expert."""
    sample_queries: int = 8
    """Training prompts listed in `moa.json`: shown as examples, and embedded as keys by another encoder."""
    seed: int = 0
    """Seed of batch sampling and LoRA initialisation."""

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size", "max_length", "checkpoint_every", "validation_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainingConfig.{name} must be at least 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0 or self.alpha <= 0:
            raise ValueError(f"learning_rate and alpha must be > 0, got {self.learning_rate} and {self.alpha}.")
        if not self.target_modules:
            raise ValueError("TrainingConfig.target_modules must name at least one module, e.g. q_proj.")
        self.target_modules = tuple(self.target_modules)


@dataclass
class Segment:
    """One expert's data: its name, domain label, description and example pairs."""

    name: str
    domain: str
    description: str
    train: list  # list of moa.corpus.Example
    validation: list
    source: str = ""
    licence: str = ""
    top_terms: list[str] = field(default_factory=list)


@dataclass
class ExpertResult:
    name: str
    folder: Path
    validation_nll_before: float
    validation_nll_after: float
    skipped: bool = False


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """Tokenize a chat pair; the loss mask is 1 on the response tokens and its end-of-turn token only."""
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (list(prompt_ids) + response_ids)[:max_length]
    mask = ([0] * len(prompt_ids) + [1] * len(response_ids))[:max_length]
    return ids, mask


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. The attention mask, not the pad id, marks real tokens (pad == end-of-turn here)."""
    length = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    loss_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (ids, mask) in enumerate(pairs):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        loss_mask[row, :len(mask)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def batch_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean response-token NLL per row. -> (batch,)."""
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_nll(logits, batch["input_ids"], batch["loss_mask"] * batch["attention_mask"])


@torch.inference_mode()
def mean_nll(model: torch.nn.Module, tokenizer, examples: Sequence, max_length: int, batch_size: int = 32) -> float:
    """Mean over examples of the response-token NLL (nats per token)."""
    pairs = [encode_pair(tokenizer, e.prompt, e.response, max_length) for e in examples]
    totals = []
    for start in range(0, len(pairs), batch_size):
        totals.append(batch_nll(model, collate(pairs[start:start + batch_size], tokenizer.pad_token_id)))
    return float(torch.cat(totals).mean()) if totals else float("nan")


def learning_rate_at(step: int, config: TrainingConfig) -> float:
    """Linear warm-up then cosine decay to 10 % of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def expert_is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE, KEYS_FILE))


def train_expert(base: BaseModel, segment: Segment, adapters_dir: Path, runs_dir: Path, config: TrainingConfig,
                 encoder: Encoder) -> ExpertResult:
    """Train, evaluate and write one expert; skip it when its folder is already complete."""
    folder = adapters_dir / segment.name
    if expert_is_complete(folder):
        metadata = json.loads((folder / METADATA_FILE).read_text())
        return ExpertResult(segment.name, folder, metadata.get("validation_nll_before", float("nan")),
                            metadata.get("validation_nll_after", float("nan")), skipped=True)
    if not segment.train:
        raise ValueError(f"Segment {segment.name!r} has no training examples.")
    run_dir = runs_dir / segment.name
    run_dir.mkdir(parents=True, exist_ok=True)
    validation = segment.validation[:config.validation_examples]
    nll_before = mean_nll(base.model, base.tokenizer, validation, config.max_length)

    torch.manual_seed(config.seed)
    lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(base.model, lora_config)
    try:
        _optimise(peft_model, base, segment, run_dir, config)
        peft_model.eval()
        nll_after = mean_nll(peft_model, base.tokenizer, validation, config.max_length)
        state = {key: value.detach().to(torch.float16).cpu().contiguous()
                 for key, value in get_peft_model_state_dict(peft_model).items()}
    finally:
        base.model = peft_model.unload()  # removes the LoRA layers, leaving the base weights untouched
        base.model.requires_grad_(False)

    _write_expert(folder, segment, state, lora_config, base, config, encoder, run_dir, nll_before, nll_after)
    logger.info("Expert %s: validation NLL %.3f -> %.3f", segment.name, nll_before, nll_after)
    return ExpertResult(segment.name, folder, nll_before, nll_after)


def _optimise(peft_model, base: BaseModel, segment: Segment, run_dir: Path, config: TrainingConfig) -> None:
    """Run the optimizer loop, resuming from `run_dir/checkpoint.pt` when a stopped run left one."""
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    start_step = 0
    checkpoint_path = run_dir / CHECKPOINT_FILE
    if checkpoint_path.is_file():
        checkpoint = torch.load(checkpoint_path, weights_only=False)
        set_peft_model_state_dict(peft_model, checkpoint["lora"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_step = checkpoint["step"]
        logger.info("Resuming %s from step %d", segment.name, start_step)
    elif (run_dir / LOSS_LOG_FILE).exists():
        (run_dir / LOSS_LOG_FILE).unlink()  # a log without a checkpoint belongs to a run that left nothing to resume

    pairs = [encode_pair(base.tokenizer, e.prompt, e.response, config.max_length) for e in segment.train]
    peft_model.train()
    progress = tqdm(range(start_step, config.steps), desc=segment.name, initial=start_step, total=config.steps)
    for step in progress:
        rng = random.Random(config.seed * 1_000_003 + step)  # batch depends on the step only, so resume is exact
        batch = collate([pairs[rng.randrange(len(pairs))] for _ in range(config.batch_size)], base.tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        loss = batch_nll(peft_model, batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
        with open(run_dir / LOSS_LOG_FILE, "a") as log:
            log.write(f"{step + 1},{loss.item():.5f}\n")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            _save_checkpoint(checkpoint_path, peft_model, optimizer, step + 1)


def _save_checkpoint(path: Path, peft_model, optimizer, step: int) -> None:
    staging = path.with_suffix(".tmp")
    torch.save({"lora": get_peft_model_state_dict(peft_model), "optimizer": optimizer.state_dict(), "step": step}, staging)
    os.replace(staging, path)


def sample_queries(segment: Segment, count: int, seed: int) -> list[str]:
    """Pick distinct training prompts of the segment, listed in `moa.json` as examples."""
    prompts = sorted({example.prompt for example in segment.train})
    random.Random(seed).shuffle(prompts)
    return prompts[:count]


def key_centroids(examples: Sequence, encoder: Encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the unit centroids of the examples' prompts and of their prompt-response pairs. -> (dim,), (dim,)."""
    prompts = encoder.encode([example.prompt for example in examples]).mean(dim=0)
    pairs = encoder.encode([f"{example.prompt} {example.response}" for example in examples]).mean(dim=0)
    return torch.nn.functional.normalize(prompts, dim=0), torch.nn.functional.normalize(pairs, dim=0)


def blend_centroids(prompt_centroid: torch.Tensor, pair_centroid: torch.Tensor) -> torch.Tensor:
    """Return the unit vector halfway between two unit centroids, as a one-key matrix. (dim,), (dim,) -> (1, dim)."""
    return torch.nn.functional.normalize(prompt_centroid + pair_centroid, dim=0).unsqueeze(0)


def expert_keys(segment: Segment, encoder: Encoder, max_examples: int = KEY_EXAMPLES) -> torch.Tensor:
    """Return the expert's key, blended from its prompt centroid and pair centroid. -> (1, dim)."""
    examples = segment.train[:max_examples]
    if not examples:
        raise ValueError(f"Segment {segment.name!r} has no training examples to compute its key from.")
    return blend_centroids(*key_centroids(examples, encoder))


def write_keys(folder: Path, keys: torch.Tensor, encoder_id: str) -> None:
    """Replace an expert's keys file and leave its other files as they are.

    The new file is written next to the folder and moved over the old one in one rename, so a stop
    half-way leaves the old key.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.keys.", dir=folder.parent))
    try:
        save_keys(staging, keys, encoder_id)
        (staging / KEYS_FILE).chmod(0o644)
        os.replace(staging / KEYS_FILE, folder / KEYS_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_expert(folder: Path, segment: Segment, state: dict[str, torch.Tensor], lora_config: LoraConfig,
                  base: BaseModel, config: TrainingConfig, encoder: Encoder, run_dir: Path,
                  nll_before: float, nll_after: float) -> None:
    """Write the expert folder to a staging folder, then move it into place in one rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        lora_config.base_model_name_or_path = base.model_id
        lora_config.save_pretrained(str(staging))
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        queries = sample_queries(segment, config.sample_queries, config.seed)
        save_keys(staging, expert_keys(segment, encoder), encoder.encoder_id)
        metadata = {
            "name": segment.name,
            "domain": segment.domain,
            "description": segment.description,
            "sample_queries": queries,
            "top_terms": segment.top_terms,
            "source": segment.source,
            "licence": segment.licence,
            "segment_size": len(segment.train),
            "training": asdict(config),
            "validation_nll_before": round(nll_before, 4),
            "validation_nll_after": round(nll_after, 4),
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if (run_dir / LOSS_LOG_FILE).is_file():
            shutil.copy(run_dir / LOSS_LOG_FILE, staging / LOSS_LOG_FILE)
        (staging / "README.md").write_text(model_card(metadata, base.model_id))
        staging.chmod(0o755)  # mkdtemp creates 0700; the library is meant to be shared
        for path in staging.iterdir():
            path.chmod(0o644)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)


def model_card(metadata: dict, base_model_id: str) -> str:
    training = metadata["training"]
    return f"""---
base_model: {base_model_id}
library_name: peft
tags: [lora, mixture-of-adapters, {metadata['domain']}]
---

# MoA expert `{metadata['name']}`

A LoRA expert for the domain **{metadata['domain']}**, trained by segmented fine-tuning on one
segment of the MoA demo corpus. It is meant to be retrieved and merged by Mixture of Adapters.

- Description: {metadata['description']}
- Data source: {metadata['source']}
- Licence of the data: {metadata['licence']}
- Segment size: {metadata['segment_size']} training pairs
- Training: {training['steps']} steps of {training['batch_size']} sequences, learning rate {training['learning_rate']},
  rank {training['rank']}, alpha {training['alpha']}, target modules {', '.join(training['target_modules'])},
  loss on response tokens only
- Validation NLL (nats per response token): {metadata['validation_nll_before']:.3f} for the base model,
  {metadata['validation_nll_after']:.3f} with this expert

Sample queries: {'; '.join(metadata['sample_queries'][:4])}
"""

