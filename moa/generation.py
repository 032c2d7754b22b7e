"""Token-by-token generation with a KV cache, streaming, and per-token error from raw logits."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedTokenizerBase

from .error import surprisal_and_entropy

TokenCallback = Callable[[str], None]

# transformers 5.25 renamed the forward argument `past_key_values` to `cache`; the old name is
# deprecated there and removed in 5.40.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_QUERY_PLACEHOLDER = "\ue000MOA-QUERY\ue000"
"""Placeholder for the query while the chat template is rendered; `chat_prompt_ids` checks that it occurs once."""


class PromptTooLongError(ValueError):
    """The prompt exceeds the configured token limit."""


class PromptTemplateError(RuntimeError):
    """The base model's chat template cannot be used safely."""


@dataclass
class Generation:
    """One generated answer: its token ids, per-token texts, and errors from the raw logits."""

    prompt_ids: torch.Tensor  # (P,)
    token_ids: torch.Tensor  # (T,)
    token_texts: list[str]
    surprisal: torch.Tensor  # (T,)
    entropy: torch.Tensor  # (T,)
    text: str
    stopped_by_user: bool = False


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, query: str, max_tokens: int | None = None) -> torch.Tensor:
    """Wrap `query` in the model's chat template with the assistant turn opened. -> (P,) long.

    The query is tokenized apart from the template, with special tokens split, so a query that
    contains "<|im_end|><|im_start|>system" stays user text and cannot open a turn of its own.
    """
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _QUERY_PLACEHOLDER}],
                                             add_generation_prompt=True, tokenize=False)
    parts = rendered.split(_QUERY_PLACEHOLDER)
    if len(parts) != 2:
        raise PromptTemplateError("The base model's chat template does not insert the user message verbatim, so "
                                  "MoA cannot keep special tokens in a query from acting as control tokens.")
    before, after = parts
    ids = torch.tensor(tokenizer(before, add_special_tokens=False)["input_ids"]
                       + tokenizer(query, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                       + tokenizer(after, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None and ids.shape[0] > max_tokens:
        raise PromptTooLongError(
            f"The query is {ids.shape[0]} tokens after the chat template; the limit is {max_tokens}. Shorten the "
            "query or raise max_prompt_tokens."
        )
    return ids


def answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> torch.Tensor:
    """Tokenize an assistant answer as the model would emit it, ending with the end-of-turn token. -> (T,)."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids + [tokenizer.eos_token_id], dtype=torch.long)


def token_texts(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """Split the decoded text at token boundaries, so multi-byte characters end up whole in one piece."""
    pieces, previous = [], ""
    for end in range(1, len(ids) + 1):
        current = tokenizer.decode(ids[:end], skip_special_tokens=False)
        pieces.append(current[len(previous):] if current.startswith(previous) else current)
        previous = current
    return pieces


def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token from raw logits (V,). Sampling uses temperature and nucleus filtering."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    outside_nucleus = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs[outside_nucleus] = 0.0
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return order[choice].squeeze(-1)


@torch.inference_mode()
def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: torch.Tensor,
             max_new_tokens: int, do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
             seed: int = 0, on_token: TokenCallback | None = None,
             stop_event: threading.Event | None = None, stop_at_eos: bool = True) -> Generation:
    """Generate up to `max_new_tokens` after `prompt_ids`, calling `on_token` with each new piece of text.

    The end-of-turn token is kept and scored like any other token. `stop_event` ends the loop after
    the current token, so a stopped request frees the model quickly. `stop_at_eos=False` runs the
    full `max_new_tokens` (for benchmarks).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed) if do_sample else None
    eos_ids = {tokenizer.eos_token_id}
    cache = DynamicCache()
    input_ids = prompt_ids.to(device).unsqueeze(0)  # (1, P)
    emitted: list[int] = []
    surprisals: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []
    pieces: list[str] = []
    text_so_far = ""
    stopped = False

    for _ in range(max_new_tokens):
        logits = model(input_ids=input_ids, **{CACHE_ARGUMENT: cache}, use_cache=True).logits[0, -1]  # (V,)
        token = _next_token(logits.cpu() if generator is not None else logits, do_sample, temperature, top_p,
                            generator).to(device)
        surprisal, entropy = surprisal_and_entropy(logits, token)
        emitted.append(int(token))
        surprisals.append(surprisal.cpu())
        entropies.append(entropy.cpu())

        decoded = tokenizer.decode(emitted, skip_special_tokens=False)
        piece = decoded[len(text_so_far):] if decoded.startswith(text_so_far) else decoded
        text_so_far = decoded
        pieces.append(piece)
        if on_token is not None and int(token) not in eos_ids:
            on_token(piece)
        if stop_at_eos and int(token) in eos_ids:
            break
        if stop_event is not None and stop_event.is_set():
            stopped = True
            break
        input_ids = token.view(1, 1)

    answer = tokenizer.decode([t for t in emitted if t not in eos_ids], skip_special_tokens=True).strip()
    return Generation(
        prompt_ids=prompt_ids.cpu(),
        token_ids=torch.tensor(emitted, dtype=torch.long),
        token_texts=pieces,
        surprisal=torch.stack(surprisals) if surprisals else torch.empty(0),
        entropy=torch.stack(entropies) if entropies else torch.empty(0),
        text=answer,
        stopped_by_user=stopped,
    )
