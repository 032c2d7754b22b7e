"""Relevance weights: turning the retrieved adapters' similarities into merge weights."""

from __future__ import annotations

import torch


def relevance_weights(similarities: torch.Tensor, method: str = "softmax", temperature: float = 0.05) -> torch.Tensor:
    """Map similarities (k,) to weights (k,) that sum to 1.

    - softmax: softmax(similarity / temperature); a low temperature concentrates on the best match.
    - normalized: similarities clamped at 0 and divided by their sum (uniform if all are <= 0).
    - uniform: 1/k each.
    """
    k = similarities.shape[0]
    if k == 0:
        return similarities.new_empty(0)
    if method == "softmax":
        return torch.softmax(similarities.float() / temperature, dim=0)
    if method == "normalized":
        positive = similarities.float().clamp(min=0.0)
        total = positive.sum()
        return positive / total if total > 0 else torch.full((k,), 1.0 / k)
    if method == "uniform":
        return torch.full((k,), 1.0 / k)
    raise ValueError(f"Unknown weighting {method!r}; expected softmax, normalized or uniform.")


def leave_one_out_weights(weights: torch.Tensor, include_alone: bool = True) -> torch.Tensor:
    """Rows of mixes for the contribution pass. (k,) -> (1 + k [+ k], k).

    Row 0 is the full mix. Row 1+i drops adapter i and rescales the others to the same total mass,
    so the mix without i is what relevance weighting over the remaining adapters would give. With
    `include_alone`, row 1+k+i is adapter i alone at weight 1.
    """
    k = weights.shape[0]
    total = weights.sum()
    rows = [weights]
    for i in range(k):
        without = weights.clone()
        without[i] = 0.0
        remaining = without.sum()
        rows.append(without * (total / remaining) if remaining.abs() > 1e-12 else without)
    if include_alone:
        rows.extend(torch.eye(k, dtype=weights.dtype))
    return torch.stack(rows)
