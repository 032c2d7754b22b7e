"""Per-token error from raw logits: surprisal, entropy and teacher-forced NLL.

Errors are computed from the model's raw logits, never from sampling-processed scores, so a
temperature or nucleus filter changes what is generated but not how it is scored. Masks come
from attention masks: SmolLM2's pad token is its end-of-turn token, which is a real target that
must be scored, so a pad-id mask would silently drop it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def surprisal_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (-log p(target), entropy of p) per position. logits: (..., V), targets: (...) -> (...), (...)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    surprisal = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return surprisal, entropy


def select_metric(surprisal: torch.Tensor, entropy: torch.Tensor, metric: str) -> torch.Tensor:
    """Pick the error named by `metric`; "nll" is the surprisal of reference tokens."""
    if metric in ("surprisal", "nll"):
        return surprisal
    if metric == "entropy":
        return entropy
    raise ValueError(f"Unknown error metric {metric!r}; expected surprisal, entropy or nll.")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis counting only mask==1 positions. (rows, T), (rows, T) -> (rows,)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def teacher_forced_logits(model: torch.nn.Module, prompt_ids: torch.Tensor, target_ids: torch.Tensor,
                          rows: int = 1) -> torch.Tensor:
    """Run prompt+target once for `rows` identical rows and return the logits that predict each target token.

    prompt_ids: (P,), target_ids: (T,) -> (rows, T, V). Every row sees the same tokens, so the rows
    differ only by the per-row adapter mix active in the model.
    """
    input_ids = torch.cat([prompt_ids, target_ids]).unsqueeze(0).expand(rows, -1)  # (rows, P+T)
    attention_mask = torch.ones_like(input_ids)
    target_length = target_ids.shape[0]
    # Only the last T+1 positions go through the LM head: with a 49k vocabulary it dominates the cost.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=target_length + 1).logits
    return logits[:, :-1]  # (rows, T, V)


@torch.inference_mode()
def teacher_forced_errors(model: torch.nn.Module, prompt_ids: torch.Tensor, target_ids: torch.Tensor,
                          metric: str, rows: int = 1) -> torch.Tensor:
    """Per-token error of `target_ids` after `prompt_ids`, for each of `rows` mixes. -> (rows, T)."""
    logits = teacher_forced_logits(model, prompt_ids, target_ids, rows)
    targets = target_ids.unsqueeze(0).expand(rows, -1)
    if metric in ("surprisal", "nll"):  # skip the entropy pass over the vocabulary when it is not needed
        return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    surprisal, entropy = surprisal_and_entropy(logits, targets)
    return select_metric(surprisal, entropy, metric)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL per row of the tokens where loss_mask is 1. logits: (B, L, V) for inputs; labels, loss_mask: (B, L).

    The logits at position t predict labels[t+1]; the mask is aligned with labels.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    shifted_mask = loss_mask[:, 1:]
    nll = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels, reduction="none")  # (B, L-1)
    return masked_mean(nll, shifted_mask)
