"""Each adapter's contribution to the error, in one batched forward pass over all the mixes.

For k adapters the batch has 1 + 2k rows (the full mix, each leave-one-out mix, each adapter
alone) plus one row with no adapter, and the mixer gives every row its own weights. Re-merging
k times would cost k separate passes; this costs one pass of a (2k + 2)-row batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapters import LoRAWeights
from .error import teacher_forced_errors
from .merging import Mixer, combine
from .weighting import leave_one_out_weights


@dataclass
class Contributions:
    """Per-token errors of every mix and the leave-one-out differences."""

    full: torch.Tensor  # (T,) error with all adapters
    without: torch.Tensor  # (k, T) error without adapter i
    alone: torch.Tensor  # (k, T) error with adapter i alone
    base: torch.Tensor  # (T,) error with no adapter

    @property
    def leave_one_out(self) -> torch.Tensor:
        """Error without adapter i minus error with all; positive means adapter i lowers the error. (k, T)."""
        return self.without - self.full.unsqueeze(0)


def mix_rows(adapters: Sequence[LoRAWeights], weights: torch.Tensor, merge_method: str, density: float,
             seed: int) -> tuple[list[LoRAWeights], torch.Tensor]:
    """Build the components and per-row weights for full, leave-one-out, alone and no-adapter rows.

    With the exact method the rows are weight vectors over the k adapters. Other methods are not
    linear in the weights, so each row's mix is combined separately and the rows select one
    combined component each.
    """
    k = len(adapters)
    rows = torch.cat([leave_one_out_weights(weights), torch.zeros(1, k)])  # (2k + 2, k)
    if merge_method == "exact":
        return list(adapters), rows
    components = []
    for row in rows[:-1]:
        kept = [(adapter, float(w)) for adapter, w in zip(adapters, row) if w != 0]
        if not kept:  # the leave-one-out row of a single adapter is the base model
            components.append(LoRAWeights("none", {}))
            continue
        components.append(combine([a for a, _ in kept], [w for _, w in kept], merge_method, density, seed=seed))
    selection = torch.zeros(rows.shape[0], len(components))
    selection[torch.arange(len(components)), torch.arange(len(components))] = 1.0  # last row stays all-zero: base
    return components, selection


def compute_contributions(model: torch.nn.Module, mixer: Mixer, adapters: Sequence[LoRAWeights], weights: torch.Tensor,
                          prompt_ids: torch.Tensor, target_ids: torch.Tensor, metric: str,
                          merge_method: str = "exact", density: float = 0.5, seed: int = 0) -> Contributions:
    """Score `target_ids` under every mix in one forward pass. weights: (k,)."""
    k = len(adapters)
    components, rows = mix_rows(adapters, weights, merge_method, density, seed)
    device = next(model.parameters()).device
    with mixer.unmerged(components, rows):
        errors = teacher_forced_errors(model, prompt_ids.to(device), target_ids.to(device), metric,
                                       rows=rows.shape[0]).cpu()  # (2k + 2, T)
    return Contributions(full=errors[0], without=errors[1:1 + k], alone=errors[1 + k:1 + 2 * k], base=errors[-1])
