"""Merge math against reference computations: PEFT's own forward and explicit ΔW sums."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from moa.adapters import LoRAModule, LoRAWeights, load_lora_weights, read_adapter
from moa.merging import MERGE_METHODS, MergeError, Mixer, combine


def random_lora(model: torch.nn.Module, adapter_id: str, rank: int, alpha: float, modules: tuple[str, ...],
                seed: int) -> LoRAWeights:
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in modules:
            A = torch.randn(rank, module.in_features, generator=generator) * 0.1
            B = torch.randn(module.out_features, rank, generator=generator) * 0.1
            result[name] = LoRAModule(A, B, alpha / rank)
    return LoRAWeights(adapter_id, result)


def effective_deltas(model: torch.nn.Module, mixer: Mixer, adapters, weights) -> dict[str, torch.Tensor]:
    """ΔW per module as the merged path applies it: W_merged - W."""
    before = {name: module.weight.detach().clone() for name, module in mixer.modules.items()}
    with mixer.merged(adapters, torch.tensor([weights])):
        return {name: module.weight.detach() - before[name] for name, module in mixer.modules.items()
                if not torch.equal(module.weight, before[name])}


@pytest.fixture
def mixed_ranks(tiny_base):
    model = tiny_base.model
    return [
        random_lora(model, "r4", 4, 8.0, ("q_proj", "v_proj"), seed=1),
        random_lora(model, "r8", 8, 4.0, ("v_proj", "o_proj"), seed=2),
        random_lora(model, "r16", 16, 16.0, ("q_proj", "down_proj"), seed=3),
    ]


def test_single_adapter_matches_peft(tiny_base, tiny_library):
    """One adapter at weight 1 gives the same logits as PEFT's own LoRA forward."""
    info = read_adapter(tiny_library / "music")
    ids = torch.tensor([[1, 520, 33, 900, 12]])
    mixer = Mixer(tiny_base.model)
    with mixer.unmerged([load_lora_weights(info)], torch.ones(1)):
        ours = tiny_base.model(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(tiny_base.model, str(info.path))
    reference = peft_model(input_ids=ids).logits
    peft_model.unload()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", [[1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.3, 0.7, 0.0], [1.0, -0.5, 0.0],
                                     [0.2, 0.3, 0.5]])
def test_merged_delta_is_weighted_sum(tiny_base, mixed_ranks, weights):
    """ΔW = Σ wᵢ (αᵢ/rᵢ) BᵢAᵢ for ranks 4, 8 and 16, α/r ≠ 1, negative weights and overlapping modules."""
    mixer = Mixer(tiny_base.model)
    deltas = effective_deltas(tiny_base.model, mixer, mixed_ranks, weights)
    expected: dict[str, torch.Tensor] = {}
    for adapter, weight in zip(mixed_ranks, weights):
        for name, module in adapter.modules.items():
            if weight != 0:
                expected[name] = expected.get(name, 0) + weight * module.scaling * (module.B @ module.A)
    assert set(deltas) == set(expected)
    for name in expected:
        torch.testing.assert_close(deltas[name], expected[name], rtol=1e-4, atol=1e-6)


def test_half_weight_halves_delta(tiny_base, mixed_ranks):
    mixer = Mixer(tiny_base.model)
    full = effective_deltas(tiny_base.model, mixer, mixed_ranks[:1], [1.0])
    half = effective_deltas(tiny_base.model, mixer, mixed_ranks[:1], [0.5])
    for name in full:
        torch.testing.assert_close(half[name], 0.5 * full[name], rtol=1e-4, atol=1e-7)


def test_unmerged_and_merged_paths_agree(tiny_base, mixed_ranks):
    model = tiny_base.model
    mixer = Mixer(model)
    weights = torch.tensor([0.5, 0.3, -0.2])
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with mixer.unmerged(mixed_ranks, weights):
        unmerged = model(input_ids=ids).logits
    with mixer.merged(mixed_ranks, weights.unsqueeze(0)):
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(unmerged, merged, rtol=1e-4, atol=1e-5)


def test_base_weights_bit_identical_after_both_paths(tiny_base, mixed_ranks):
    model = tiny_base.model
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    mixer = Mixer(model)
    ids = torch.tensor([[1, 2, 3]])
    with mixer.merged(mixed_ranks, torch.tensor([[0.7, 0.2, 0.1]])):
        model(input_ids=ids)
    with mixer.unmerged(mixed_ranks, torch.tensor([0.7, 0.2, 0.1])):
        model(input_ids=ids)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert not any(module._forward_hooks for module in mixer.modules.values())


def test_merged_path_restores_after_exception(tiny_base, mixed_ranks):
    model = tiny_base.model
    original = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(RuntimeError, match="boom"):
        with Mixer(model).merged(mixed_ranks, torch.tensor([[1.0, 1.0, 1.0]])):
            raise RuntimeError("boom")
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, original)


def test_per_row_weights_match_separate_runs(tiny_base, mixed_ranks):
    """Each batch row may carry its own mix: row b equals the same mix run alone."""
    model = tiny_base.model
    mixer = Mixer(model)
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, -0.3, 0.4]])
    ids = torch.tensor([[1, 50, 60, 70]]).expand(3, -1)
    with mixer.unmerged(mixed_ranks, rows):
        batched = model(input_ids=ids).logits
    for row in range(3):
        with mixer.unmerged(mixed_ranks, rows[row]):
            alone = model(input_ids=ids[:1]).logits
        torch.testing.assert_close(batched[row:row + 1], alone, rtol=1e-4, atol=1e-5)


def test_cat_combination_equals_exact(tiny_base, mixed_ranks):
    mixer = Mixer(tiny_base.model)
    weights = [0.6, 0.3, 0.1]
    exact = effective_deltas(tiny_base.model, mixer, mixed_ranks, weights)
    cat = effective_deltas(tiny_base.model, mixer, [combine(mixed_ranks, weights, "cat")], [1.0])
    for name in exact:
        torch.testing.assert_close(cat[name], exact[name], rtol=1e-4, atol=1e-6)


def test_svd_combination_is_low_rank_approximation(tiny_base, mixed_ranks):
    combined = combine(mixed_ranks[:2], [0.5, 0.5], "svd")
    for module in combined.modules.values():
        assert module.rank == 8
    # q_proj holds only the rank-4 adapter, so rank 8 reproduces it exactly
    name = "model.layers.0.self_attn.q_proj"
    expected = 0.5 * mixed_ranks[0].modules[name].delta()
    torch.testing.assert_close(combined.modules[name].delta(), expected, rtol=1e-4, atol=1e-5)


def test_linear_combination_matches_peft(tiny_base, tiny_library):
    """The linear method reproduces PEFT's add_weighted_adapter (with its A/B cross terms)."""
    from moa.adapters import read_adapter as read

    infos = [read(tiny_library / "music"), read(tiny_library / "music")]
    peft_model = PeftModel.from_pretrained(tiny_base.model, str(infos[0].path), adapter_name="a")
    peft_model.load_adapter(str(infos[1].path), adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], [0.7, 0.4], "mix", combination_type="linear")
    name = "model.layers.0.self_attn.q_proj"
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    reference = layer.get_delta_weight("mix")
    ours = combine([load_lora_weights(info) for info in infos], [0.7, 0.4], "linear").modules[name].delta()
    peft_model.unload()
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_equal_rank_methods_reject_mixed_ranks(mixed_ranks, method):
    with pytest.raises(MergeError, match="equal rank"):
        combine(mixed_ranks, [0.5, 0.3, 0.2], method)


@pytest.mark.parametrize("method", sorted(set(MERGE_METHODS) - {"exact"}))
def test_every_method_produces_finite_lora(tiny_base, method):
    adapters = [random_lora(tiny_base.model, f"a{i}", 8, 8.0, ("q_proj",), seed=i) for i in range(3)]
    combined = combine(adapters, [0.5, 0.3, 0.2], method, density=0.5)
    assert combined.modules
    for module in combined.modules.values():
        assert torch.isfinite(module.delta()).all()


def test_unknown_method_rejected(mixed_ranks):
    with pytest.raises(MergeError, match="Unknown combination method 'average'"):
        combine(mixed_ranks, [1.0, 0.0, 0.0], "average")


def test_wrong_weight_shape_rejected(tiny_base, mixed_ranks):
    with pytest.raises(MergeError, match=r"shape \(rows, 3\)"):
        with Mixer(tiny_base.model).unmerged(mixed_ranks, torch.ones(2)):
            pass
