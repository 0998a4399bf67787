"""Every model family, pruned: masked = compacted at several points of a cubic schedule,
stock ``AutoModelFor*`` loads the compacted export with no missing or unexpected keys and
gives the same logits, and pruned structures never return."""

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

from kdlab.families import FAMILIES
from kdlab.pruning import Pruner, compacted_copy, compacted_parameter_count
from tests.families import TARGET, TINY, tiny_config

AUTO = {
    "sequence_classification": AutoModelForSequenceClassification,
    "question_answering": AutoModelForQuestionAnswering,
    "masked_lm": AutoModelForMaskedLM,
}
FAMILY_NAMES = sorted({type(f).__name__ for f in FAMILIES.values()})


def test_every_family_module_has_a_tiny_config():
    covered = {type(FAMILIES[model_type]).__name__ for model_type in TINY}
    assert covered == set(FAMILY_NAMES)


def build(family: str, head: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, attn_implementation="eager", **overrides)
    return AUTO[head].from_config(config).eval()


def inputs(seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(5, 40, (3, 12), generator=generator),
        "attention_mask": torch.tensor([[1] * 12, [1] * 9 + [0] * 3, [1] * 5 + [0] * 7]),
    }


def schedule(model, steps: int = 12):
    """A Pruner on ``model`` driven through a cubic schedule with random scores; yields
    after every step that changed the masks."""
    pruner = Pruner(model, target=TARGET, update_interval=2, initial_warmup=0.1, final_warmup=0.2)
    generator = torch.Generator().manual_seed(3)
    m = pruner.masks

    def random_scores():
        return {
            k: torch.rand(getattr(m, k).shape, generator=generator)
            for k in ("hidden", "heads", "ffn")
        }

    pruner.structure_scores = random_scores
    for step in range(1, steps + 1):
        before = [m.hidden.clone(), m.heads.clone(), m.ffn.clone()]
        if pruner.update(step, steps):
            yield pruner, before


def real_tokens(states, mask):
    return states[mask.bool()]


@pytest.mark.parametrize("head", sorted(AUTO))
@pytest.mark.parametrize("family", sorted(TINY))
def test_masked_and_compacted_models_agree_through_a_cubic_schedule(family, head):
    model = build(family, head)
    batch = inputs()
    options = {"output_hidden_states": True}
    points = 0
    for pruner, _ in schedule(model):
        masks = pruner.masks
        masked = model(**batch, **options)
        small = compacted_copy(model, masks).eval()
        out = small(**batch, **options)
        names = [k for k in ("logits", "start_logits", "end_logits") if k in out]
        for name in names:
            torch.testing.assert_close(masked[name], out[name], rtol=1e-5, atol=1e-5)
        keep = masks.kept_indices("hidden")
        real = batch["attention_mask"]
        for h_masked, h_small in zip(masked.hidden_states, out.hidden_states, strict=True):
            torch.testing.assert_close(
                real_tokens(h_masked[..., keep], real),
                real_tokens(h_small, real),
                rtol=1e-5,
                atol=1e-5,
            )
            # Pruned dims are exactly zero in the masked model's residual stream.
            assert real_tokens(h_masked[..., masks.hidden == 0], real).abs().max() == 0
        assert sum(p.numel() for p in small.parameters()) == compacted_parameter_count(model, masks)
        points += 1
    assert points >= 3
    assert pruner.masks.counts() == {"hidden": 16, "heads": 2, "ffn": 32}


@pytest.mark.parametrize("head", sorted(AUTO))
@pytest.mark.parametrize("family", sorted(TINY))
def test_compacted_export_loads_with_stock_auto_classes(family, head, tmp_path):
    model = build(family, head)
    pruner, _ = list(schedule(model))[-1]
    batch = inputs()
    expected = model(**batch)
    compacted_copy(model, pruner.masks).save_pretrained(tmp_path)
    # The model's own attention implementation: eager and SDPA define padded positions whose
    # every key is masked (beyond a local attention window) differently.
    loaded, info = AUTO[head].from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(loaded.config) is type(model.config)
    out = loaded.eval()(**batch)
    for name in ("logits", "start_logits", "end_logits"):
        if name in out:
            torch.testing.assert_close(out[name], expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(TINY))
def test_pruned_structures_never_return(family):
    model = build(family, "masked_lm")
    for pruner, before in schedule(model, steps=20):
        m = pruner.masks
        for old, new in zip(before, (m.hidden, m.heads, m.ffn), strict=True):
            assert (new <= old).all()
    counts = pruner.masks.counts()
    assert counts == {"hidden": 16, "heads": 2, "ffn": 32}
