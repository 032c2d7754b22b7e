"""Merging LoRA adapters into the base model, weighted by relevance.

The default method, "exact", adds Σᵢ wᵢ (αᵢ/rᵢ) BᵢAᵢ to each target module: adapters may have any
ranks and overlapping target modules, and there are no cross terms BᵢAⱼ. It is computed without
forming ΔW by concatenating the adapters along the rank axis: A_cat (R, in), B_cat (out, R) and a
per-column scale (rows, R), so a batch can carry a different mix in every row.

Two execution paths give the same result:
- `Mixer.unmerged(...)`: forward hooks add ((x A_catᵀ) · scale) B_catᵀ beside the frozen weights.
  Cheap to switch; costs two thin matmuls per module per token.
- `Mixer.merged(...)`: the deltas are added into the weights and restored bit-exactly on exit,
  from a copy of the original tensors. Costs one dense update per module; generation then runs at
  the base model's speed.

The PEFT `add_weighted_adapter` combination types are available through `combine`, which turns k
adapters into one LoRA per module that the mixer then applies with weight 1.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from peft.utils import merge_utils

from .adapters import LoRAModule, LoRAWeights

logger = logging.getLogger(__name__)

MERGE_METHODS: dict[str, str] = {
    "exact": "Σ w·(α/r)·B·A per module; any ranks and target modules; no cross terms (default).",
    "cat": "Concatenates w·(α/r)·A and B along the rank axis; equal to exact, at rank Σr.",
    "linear": "PEFT linear: weighted sums of the A and of the B matrices separately (adds cross terms BᵢAⱼ); "
              "equal ranks only.",
    "svd": "Exact weighted ΔW, truncated back to the largest adapter rank by SVD (float32).",
    "ties": "PEFT ties on A and B separately: trim to `density`, elect signs, disjoint mean; equal ranks only.",
    "dare_linear": "PEFT dare_linear on A and B separately: random drop to `density`, rescale, sum; equal ranks only.",
    "dare_ties": "PEFT dare_ties on A and B separately: random drop, then ties sign election; equal ranks only.",
    "magnitude_prune": "PEFT magnitude_prune on A and B separately: keep the largest `density` fraction; "
                       "equal ranks only.",
}
_SEPARATE_AB_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


class MergeError(ValueError):
    """Adapters cannot be combined with the requested method."""


@dataclass
class _ModulePlan:
    """The concatenated LoRA factors for one module and the per-row scale of their rank columns."""

    A: torch.Tensor  # (R, in)
    B: torch.Tensor  # (out, R)
    scale: torch.Tensor  # (rows, R)


def _plan_modules(components: Sequence[LoRAWeights], weights: torch.Tensor) -> dict[str, _ModulePlan]:
    """Group every component's factors by module. weights: (rows, num_components)."""
    per_module: dict[str, list[tuple[int, LoRAModule]]] = {}
    for index, component in enumerate(components):
        for name, module in component.modules.items():
            per_module.setdefault(name, []).append((index, module))

    plans = {}
    for name, entries in per_module.items():
        A = torch.cat([module.A for _, module in entries], dim=0)
        B = torch.cat([module.B for _, module in entries], dim=1)
        columns = [weights[:, index:index + 1].expand(-1, module.rank) * module.scaling for index, module in entries]
        scale = torch.cat(columns, dim=1).to(A.dtype)  # (rows, R)
        plans[name] = _ModulePlan(A, B, scale)
    return plans


def _check_weights(components: Sequence[LoRAWeights], weights: torch.Tensor) -> torch.Tensor:
    if weights.ndim == 1:
        weights = weights.unsqueeze(0)
    if weights.ndim != 2 or weights.shape[1] != len(components):
        raise MergeError(f"Expected weights of shape (rows, {len(components)}), got {tuple(weights.shape)}.")
    return weights


class Mixer:
    """Applies weighted mixes of LoRA adapters to one base model, on either execution path."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.modules = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}

    def _target(self, name: str) -> torch.nn.Linear:
        try:
            return self.modules[name]
        except KeyError:
            raise MergeError(f"Module {name!r} is not a Linear layer of the base model.") from None

    @contextlib.contextmanager
    def unmerged(self, components: Sequence[LoRAWeights], weights: torch.Tensor) -> Iterator[None]:
        """Apply the mix beside the frozen weights; row b of every batch uses weights[b] (or weights[0] for all)."""
        if not components:
            yield
            return
        device = next(self.model.parameters()).device
        plans = _plan_modules(components, _check_weights(components, weights).to(device))
        handles = [self._target(name).register_forward_hook(_lora_hook(plan)) for name, plan in plans.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def merged(self, components: Sequence[LoRAWeights], weights: torch.Tensor) -> Iterator[None]:
        """Add the mix's deltas into the base weights; restore the original tensors bit-exactly on exit."""
        weights = _check_weights(components, weights)
        if weights.shape[0] != 1:
            raise MergeError(f"The merged path applies one mix at a time, got {weights.shape[0]} rows of weights.")
        if not components:
            yield
            return
        plans = _plan_modules(components, weights.to(next(self.model.parameters()).device))
        originals: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, plan in plans.items():
                    target = self._target(name)
                    originals[name] = target.weight.detach().clone()
                    delta = (plan.B.float() * plan.scale[0].float()) @ plan.A.float()  # (out, in)
                    target.weight.add_(delta.to(target.weight.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, original in originals.items():
                    self._target(name).weight.copy_(original)


def _lora_hook(plan: _ModulePlan):
    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        hidden = x.to(plan.A.dtype) @ plan.A.T  # (batch, seq, R)
        scale = plan.scale
        if scale.shape[0] != 1 and scale.shape[0] != hidden.shape[0]:
            raise MergeError(f"The mix has {scale.shape[0]} rows of weights but the batch has {hidden.shape[0]} rows.")
        hidden = hidden * scale.view(scale.shape[0], *([1] * (hidden.ndim - 2)), -1)
        return output + (hidden @ plan.B.T).to(output.dtype)  # (batch, seq, out)

    return hook


def combine(adapters: Sequence[LoRAWeights], weights: Sequence[float], method: str,
            density: float = 0.5, majority_sign_method: str = "total", seed: int = 0) -> LoRAWeights:
    """Combine adapters into one LoRA with PEFT's semantics for `method`; apply it with weight 1.

    "exact" is not a combination: pass the adapters and weights to the `Mixer` directly.
    """
    if method not in MERGE_METHODS or method == "exact":
        raise MergeError(f"Unknown combination method {method!r}; choose one of {sorted(set(MERGE_METHODS) - {'exact'})}.")
    if len(adapters) != len(weights) or not adapters:
        raise MergeError(f"Expected one weight per adapter, got {len(weights)} weights for {len(adapters)} adapters.")
    if method in _SEPARATE_AB_METHODS:
        ranks = {module.rank for adapter in adapters for module in adapter.modules.values()}
        if len(ranks) != 1:
            raise MergeError(f"Merge method {method!r} needs adapters of equal rank, got ranks {sorted(ranks)}; "
                             "use 'exact', 'cat' or 'svd'.")

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # dare's random pruning must be reproducible for a given request
    try:
        # like PEFT, svd truncates every module to the largest rank among the adapters
        svd_rank = max(module.rank for adapter in adapters for module in adapter.modules.values())
        modules = {name: _combine_module(entries, method, density, majority_sign_method, svd_rank)
                   for name, entries in _entries_by_module(adapters, weights).items()}
    finally:
        torch.random.set_rng_state(generator_state)
    combined_id = f"{method}(" + ",".join(adapter.adapter_id for adapter in adapters) + ")"
    return LoRAWeights(combined_id, modules)


def _entries_by_module(adapters: Sequence[LoRAWeights], weights: Sequence[float]) -> dict[str, list[tuple[LoRAModule, float]]]:
    entries: dict[str, list[tuple[LoRAModule, float]]] = {}
    for adapter, weight in zip(adapters, weights):
        for name, module in adapter.modules.items():
            entries.setdefault(name, []).append((module, float(weight)))
    return entries


def _combine_module(entries: list[tuple[LoRAModule, float]], method: str, density: float,
                    majority_sign_method: str, svd_rank: int) -> LoRAModule:
    dtype = entries[0][0].A.dtype
    if method == "cat":
        A = torch.cat([module.A * (weight * module.scaling) for module, weight in entries], dim=0)
        B = torch.cat([module.B for module, _ in entries], dim=1)
        return LoRAModule(A, B, 1.0)
    if method == "svd":
        delta = sum(weight * module.delta() for module, weight in entries)  # (out, in), float32
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return LoRAModule(Vh[:svd_rank].to(dtype), (U[:, :svd_rank] * S[:svd_rank]).to(dtype), 1.0)

    # PEFT puts sqrt(|w·s|) on each factor and the sign on A, then merges A's and B's separately.
    weights_a = torch.tensor([math.copysign(math.sqrt(abs(w * m.scaling)), w * m.scaling) for m, w in entries])
    weights_b = torch.tensor([math.sqrt(abs(w * m.scaling)) for m, w in entries])
    factors_a = [module.A.float() for module, _ in entries]
    factors_b = [module.B.float() for module, _ in entries]
    A = _separate_merge(factors_a, weights_a, method, density, majority_sign_method)
    B = _separate_merge(factors_b, weights_b, method, density, majority_sign_method)
    return LoRAModule(A.to(dtype), B.to(dtype), 1.0)


def _separate_merge(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float,
                    majority_sign_method: str) -> torch.Tensor:
    if method == "linear":
        return merge_utils.task_arithmetic(tensors, weights)
    if method == "ties":
        return merge_utils.ties(tensors, weights, density, majority_sign_method)
    if method == "dare_linear":
        return merge_utils.dare_linear(tensors, weights, density)
    if method == "dare_ties":
        return merge_utils.dare_ties(tensors, weights, density, majority_sign_method)
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, weights, density)
    raise MergeError(f"No separate A/B merge for method {method!r}.")
