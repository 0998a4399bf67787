"""Pruning component: schedules, PLATON updates, structure selection, masked = compacted."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)

from kdlab.errors import ConfigError
from kdlab.pruning import Pruner, StructuredMasks, compacted_copy, compacted_parameter_count
from kdlab.pruning import importance as importance_module
from kdlab.pruning.importance import PlatonImportance, all_finite
from kdlab.pruning.masks import MaskedLayerNorm
from kdlab.pruning.pruner import _keep_top
from kdlab.pruning.schedule import cubic_remaining, oneshot_remaining
from kdlab.train import CONF_DIR
from kdlab.validation import check_node
from tests.conftest import compose


def tiny_config(**kwargs) -> BertConfig:
    base = dict(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    return BertConfig(**{**base, **kwargs})


TARGET = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 24}


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 1.0), (10, 1.0), (25, 0.56640625), (40, 0.34375), (70, 0.25), (71, 0.25), (100, 0.25)],
)
def test_cubic_schedule_hand_computed(step, expected):
    # T = 100, t_i = 10, t_f = 30, r_T = 0.25: r = 0.25 + 0.75 (1 - (t - 10) / 60)^3.
    assert cubic_remaining(step, 100, 10, 30, 0.25) == pytest.approx(expected)


def test_oneshot_schedule_prunes_at_initial_warmup():
    assert oneshot_remaining(9, 100, 10, 30, 0.25) == 1.0
    assert oneshot_remaining(10, 100, 10, 30, 0.25) == 0.25
    assert oneshot_remaining(99, 100, 10, 30, 0.25) == 0.25


def test_platon_updates_on_a_2x2_example():
    param = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    importance = PlatonImportance(beta1=0.5, beta2=0.5)
    # s1 = |θ g1| = [[.5, 2], [3, 1]]: Ī1 = s1 / 2, Ū1 = |s1 − Ī1| / 2.
    param.grad = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
    importance.update([("w", param)])
    torch.testing.assert_close(importance.sensitivity["w"], torch.tensor([[0.25, 1.0], [1.5, 0.5]]))
    torch.testing.assert_close(
        importance.uncertainty["w"], torch.tensor([[0.125, 0.5], [0.75, 0.25]])
    )
    # s2 = [[1, 0], [0, .5]]: Ī2 = [[.625, .5], [.75, .5]], Ū2 = [[.25, .5], [.75, .125]].
    param.grad = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    importance.update([("w", param)])
    torch.testing.assert_close(
        importance.score("w"), torch.tensor([[0.15625, 0.25], [0.5625, 0.0625]])
    )


@pytest.mark.parametrize("window", [False, True])
def test_blocked_update_equals_the_formula_across_block_edges(monkeypatch, window):
    # Blocks of 7 entries split both parameters unevenly (45 and 13 entries); the bf16 one
    # is scored in fp32 from its bf16 values, as a whole-tensor computation would.
    monkeypatch.setattr(importance_module, "CPU_BLOCK", 7)
    torch.manual_seed(0)
    params = {
        "w": torch.nn.Parameter(torch.randn(5, 9)),
        "b": torch.nn.Parameter(torch.randn(13).to(torch.bfloat16)),
    }
    beta1, beta2 = 0.85, 0.95
    importance = PlatonImportance(beta1=beta1, beta2=beta2, window=window)
    ema_i = {k: torch.zeros(p.shape) for k, p in params.items()}
    ema_u = {k: torch.zeros(p.shape) for k, p in params.items()}
    window_sum = {k: torch.zeros(p.shape) for k, p in params.items()}

    def reference_step(name: str, s: torch.Tensor) -> None:
        ema_i[name] = beta1 * ema_i[name] + (1 - beta1) * s
        ema_u[name] = beta2 * ema_u[name] + (1 - beta2) * (s - ema_i[name]).abs()

    for _ in range(3):
        for name, param in params.items():
            param.grad = torch.randn(param.shape).to(param.dtype)
            s = (param.detach().float() * param.grad.float()).abs()
            if window:
                window_sum[name] += s
            else:
                reference_step(name, s)
        importance.update(list(params.items()))
    if window:
        importance.end_window()
        for name in params:
            reference_step(name, window_sum[name] / 3)
    for name in params:
        assert importance.sensitivity[name].dtype == torch.float32
        torch.testing.assert_close(importance.sensitivity[name], ema_i[name])
        torch.testing.assert_close(importance.uncertainty[name], ema_u[name])


@pytest.mark.parametrize(
    ("tensors", "finite"),
    [
        ([torch.ones(3), torch.zeros(2, 2)], True),
        ([torch.ones(3), torch.tensor([1.0, float("nan")])], False),
        ([torch.tensor([float("inf"), -1.0])], False),
        ([torch.tensor([float("-inf")]), torch.tensor([float("inf")])], False),  # sums to NaN
        # fp16 entries whose fp16 sum would overflow (65,504) are finite: summed in fp32.
        ([torch.full((10,), 60000.0, dtype=torch.float16)], True),
        ([torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)], False),
        ([], True),
    ],
)
def test_all_finite(tensors, finite):
    assert all_finite(tensors) is finite


def test_plain_sensitivity_when_beta2_is_one():
    param = torch.nn.Parameter(torch.tensor([[2.0]]))
    param.grad = torch.tensor([[3.0]])
    importance = PlatonImportance(beta1=0.5, beta2=1.0)
    importance.update([("w", param)])
    assert importance.score("w").item() == pytest.approx(3.0)


def test_structure_scores_sum_their_parameters():
    model = BertForMaskedLM(tiny_config())
    pruner = Pruner(model, target=TARGET)
    torch.manual_seed(0)
    for _, p in pruner.params:
        p.grad = torch.randn_like(p)
    pruner.importance = PlatonImportance(beta1=0.0, beta2=1.0)  # score = |θ g| of this step
    pruner.importance.update(pruner.params)
    scores = pruner.structure_scores()
    s = {n: (p * p.grad).abs() for n, p in pruner.params}
    layer = "bert.encoder.layer.1."
    neuron = 5  # FFN neuron: its up-projection row and bias, its down-projection column
    expected = (
        s[layer + "intermediate.dense.weight"][neuron].sum()
        + s[layer + "intermediate.dense.bias"][neuron]
        + s[layer + "output.dense.weight"][:, neuron].sum()
    )
    torch.testing.assert_close(scores["ffn"][1, neuron], expected)
    head, d = 2, 8  # head 2 of layer 1: rows 16..23 of Q, K, V, columns of the output proj
    rows = slice(head * d, (head + 1) * d)
    expected = s[layer + "attention.output.dense.weight"][:, rows].sum() + sum(
        s[layer + f"attention.self.{m}.weight"][rows].sum()
        + s[layer + f"attention.self.{m}.bias"][rows].sum()
        for m in ("query", "key", "value")
    )
    torch.testing.assert_close(scores["heads"][1, head], expected)
    # Hidden dim 3 appears in the embeddings (word, position, type) among others.
    word = s["bert.embeddings.word_embeddings.weight"][:, 3].sum()
    assert scores["hidden"][3] > word


def test_update_prunes_lowest_scores_with_equal_counts_per_layer():
    model = BertForMaskedLM(tiny_config())
    pruner = Pruner(model, target=TARGET, schedule="oneshot", initial_warmup=0.0, final_warmup=0.0)
    scores = {
        "hidden": torch.arange(32.0).flip(0),  # the last 16 dims score lowest
        "heads": torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]]),
        "ffn": torch.stack([torch.arange(64.0), torch.arange(64.0).flip(0)]),
    }
    pruner.structure_scores = lambda: scores
    assert pruner.update(step=1, total=10)
    m = pruner.masks
    assert m.hidden[:16].all() and not m.hidden[16:].any()
    assert m.heads.tolist() == [[1, 0, 1, 0], [0, 0, 1, 1]]
    assert m.ffn.sum(1).tolist() == [24, 24]
    assert m.ffn[0, 40:].all() and m.ffn[1, :24].all()
    assert pruner.finished
    assert not pruner.update(step=2, total=10)  # nothing left to do


def test_cubic_pruner_reaches_target_and_never_restores():
    model = BertForMaskedLM(tiny_config())
    pruner = Pruner(model, target=TARGET, update_interval=3, initial_warmup=0.1, final_warmup=0.2)
    torch.manual_seed(0)
    history = []
    for step in range(1, 21):
        pruner.structure_scores = lambda: {
            "hidden": torch.rand(32),
            "heads": torch.rand(2, 4),
            "ffn": torch.rand(2, 64),
        }
        before = pruner.masks.ffn.clone()
        pruner.update(step, 20)
        assert (pruner.masks.ffn <= before).all()  # pruned structures stay pruned
        history.append(pruner.current_counts()["ffn"])
    assert history[0] == 64 and history[-1] == 24
    assert pruner.masks.counts() == {"hidden": 16, "heads": 2, "ffn": 24}


def random_masks(model) -> StructuredMasks:
    masks = StructuredMasks.for_model(model)
    masks.install(model)
    generator = torch.Generator().manual_seed(1)
    masks.hidden.zero_()[torch.randperm(32, generator=generator)[:16]] = 1
    for layer in range(2):
        masks.heads[layer].zero_()[torch.randperm(4, generator=generator)[:2]] = 1
        masks.ffn[layer].zero_()[torch.randperm(64, generator=generator)[:24]] = 1
    masks.refresh()  # written in place: rebuild the cached kept indices
    return masks


@pytest.mark.parametrize("model_cls", [BertForMaskedLM, BertForSequenceClassification])
def test_masked_and_compacted_models_give_the_same_outputs(model_cls, tmp_path):
    torch.manual_seed(0)
    model = model_cls(tiny_config()).eval()
    masks = random_masks(model)
    inputs = {
        "input_ids": torch.randint(5, 40, (3, 12)),
        "attention_mask": torch.tensor([[1] * 12, [1] * 9 + [0] * 3, [1] * 5 + [0] * 7]),
    }
    options = {"output_hidden_states": True, "output_attentions": True}
    masked = model(**inputs, **options)
    small = compacted_copy(model, masks).eval()
    out = small(**inputs, **options)
    torch.testing.assert_close(masked.logits, out.logits)
    keep = masks.kept_indices("hidden")
    for h_masked, h_small in zip(masked.hidden_states, out.hidden_states, strict=True):
        torch.testing.assert_close(h_masked[..., keep], h_small)
        # Pruned dims are exactly zero in the masked model's residual stream.
        assert h_masked[..., masks.hidden == 0].abs().max() == 0
    for layer, (a_masked, a_small) in enumerate(
        zip(masked.attentions, out.attentions, strict=True)
    ):
        kept_heads = masks.heads[layer].nonzero().squeeze(1)
        torch.testing.assert_close(a_masked[:, kept_heads], a_small)
    assert (small.config.hidden_size, small.config.num_attention_heads) == (16, 2)
    assert small.config.intermediate_size == 24
    assert sum(p.numel() for p in small.parameters()) == compacted_parameter_count(model, masks)


def test_compacted_model_loads_with_stock_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config()).eval()
    masks = random_masks(model)
    inputs = {"input_ids": torch.randint(5, 40, (2, 8))}
    expected = model(**inputs).logits
    compacted_copy(model, masks).save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(**inputs).logits, expected)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert classifier(**inputs).logits.shape == (2, 3)
    assert classifier.config.hidden_size == 16


def test_target_shape_errors_name_the_config_keys():
    model = BertForMaskedLM(tiny_config())
    with pytest.raises(ConfigError, match="model.target.hidden_size=24"):
        Pruner(model, target={**TARGET, "hidden_size": 24})
    with pytest.raises(ConfigError, match="model=tiny"):
        Pruner(model, target=None)
    cfg = compose(["pruning=homotopic", "pruning.schedule=linear", "run_dir=unused"])
    with pytest.raises(ConfigError, match="pruning.schedule='linear' must be one of"):
        check_node(cfg.pruning, "pruning", Pruner, ["model"])


@pytest.mark.parametrize(
    ("preset", "millions"), [("tiny", 14.27), ("xsmall", 15.85), ("small", 17.42), ("base", 65.22)]
)
def test_homobert_presets_have_the_paper_sizes(preset, millions):
    # A BERT-base shape (vocab 30522, 12 layers) pruned to the preset, counted without pooler
    # and MLM head transform, built on the meta device (no download, no memory).
    target = OmegaConf.load(f"{CONF_DIR}/model/{preset}.yaml").target
    config = BertConfig(
        hidden_size=target.hidden_size,
        num_attention_heads=target.num_attention_heads,
        intermediate_size=target.intermediate_size,
    )
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=False)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(millions, abs=0.01)
    assert target.hidden_size // target.num_attention_heads == 64  # BERT-base head size


def test_minilm_half_preset_halves_every_width_and_keeps_the_head_size():
    target = OmegaConf.load(f"{CONF_DIR}/model/minilm_half.yaml").target
    # MiniLM-L6: hidden 384, 12 heads of 32, FFN 1536.
    assert (target.hidden_size, target.num_attention_heads, target.intermediate_size) == (
        192,
        6,
        768,
    )
    assert target.hidden_size == target.num_attention_heads * 32


# ------------------------------------------------------------- precision and host syncs
def _pruned_norm(width: int = 8, kept: int = 5) -> tuple[torch.nn.Module, StructuredMasks]:
    """A MaskedLayerNorm of ``width`` dims keeping the first ``kept``, with random affine."""
    masks = StructuredMasks(1, width, 1, 4)
    masks.load_state_dict({**masks.state_dict(), "hidden": (torch.arange(width) < kept).float()})
    norm = torch.nn.LayerNorm(width)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    return MaskedLayerNorm.wrap(norm, masks), masks


def _kept_norm_reference(norm, x: Tensor, kept: int) -> Tensor:
    """LayerNorm of the first ``kept`` dims in fp32, zeros after them."""
    head = F.layer_norm(
        x[..., :kept].float(), (kept,), norm.weight[:kept].float(), norm.bias[:kept].float()
    )
    return F.pad(head, (0, x.size(-1) - kept))


def test_masked_layernorm_keeps_a_bf16_input_bf16_like_layernorm():
    torch.manual_seed(0)
    norm, _ = _pruned_norm()
    x = torch.randn(2, 3, 8).bfloat16()  # fp32 weights, bf16 input: nn.LayerNorm gives bf16
    out = norm(x)
    assert out.dtype == torch.nn.functional.layer_norm(x, (8,), norm.weight, norm.bias).dtype
    torch.testing.assert_close(out.float(), _kept_norm_reference(norm, x, 5), atol=2e-2, rtol=0)
    assert out[..., 5:].abs().max() == 0


def test_masked_layernorm_under_cpu_autocast_matches_layernorm_dtype():
    torch.manual_seed(0)
    norm, _ = _pruned_norm()
    for x in (torch.randn(2, 3, 8), torch.randn(2, 3, 8).bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(x)
            expected = F.layer_norm(x, (8,), norm.weight, norm.bias).dtype
        assert out.dtype == expected
        torch.testing.assert_close(out.float(), _kept_norm_reference(norm, x, 5), atol=2e-2, rtol=0)


def test_masked_layernorm_returns_fp32_when_layer_norm_upcasts(monkeypatch):
    # CUDA autocast runs layer_norm in fp32 whatever the input (its fp32 op list); CPU
    # autocast does not, so emulate that policy: every floating input cast to fp32.
    torch.manual_seed(0)
    norm, _ = _pruned_norm()
    original = F.layer_norm

    def fp32_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        as32 = [t.float() if t is not None else None for t in (x, weight, bias)]
        return original(as32[0], shape, as32[1], as32[2], eps)

    monkeypatch.setattr(F, "layer_norm", fp32_layer_norm)
    x = torch.randn(2, 3, 8).bfloat16()
    out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _kept_norm_reference(norm, x, 5))


def test_masked_forward_calls_no_nonzero(monkeypatch):
    # nonzero() blocks the host until the device has caught up; the kept indices are
    # cached when the masks change, so a forward pass must not need it.
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config()).eval()
    masks = random_masks(model)
    calls = []
    original = Tensor.nonzero

    def counting_nonzero(self, *args, **kwargs):
        calls.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Tensor, "nonzero", counting_nonzero)
    monkeypatch.setattr(torch, "nonzero", lambda t, *a, **k: counting_nonzero(t, *a, **k))
    model(input_ids=torch.randint(5, 40, (2, 8)))
    assert masks.counts() == {"hidden": 16, "heads": 2, "ffn": 24}
    assert calls == []


def test_counts_are_exact_and_masks_stay_fp32_when_cast_to_bf16():
    # 2,999 ones out of 3,072 sum to 2,992 in bf16 (8 significant bits).
    masks = StructuredMasks(1, 64, 4, 3072)
    ffn = torch.ones(1, 3072)
    ffn[0, 2999:] = 0
    masks.load_state_dict({**masks.state_dict(), "ffn": ffn})
    masks.bfloat16()
    assert masks.counts()["ffn"] == 2999
    assert masks.kept_indices("ffn", 0).numel() == 2999
    assert masks.ffn.dtype == masks.hidden.dtype == masks.heads.dtype == torch.float32


def test_bf16_cast_pruner_counts_finished_and_compaction_agree():
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config(intermediate_size=3072))
    target = {**TARGET, "intermediate_size": 2999}
    pruner = Pruner(model, target=target, schedule="oneshot", initial_warmup=0.0, final_warmup=0.0)
    model.bfloat16(), pruner.bfloat16()
    pruner.structure_scores = lambda: {
        "hidden": torch.rand(32),
        "heads": torch.rand(2, 4),
        "ffn": torch.rand(2, 3072),
    }
    assert pruner.update(step=1, total=10)
    assert pruner.current_counts() == {"heads": 2, "ffn": 2999}
    assert pruner.finished
    small = compacted_copy(model, pruner.masks)
    assert small.config.intermediate_size == 2999
    assert sum(p.numel() for p in small.parameters()) == pruner.parameter_count()
    assert pruner.masks.ffn.dtype == torch.float32


def test_masks_cache_follows_load_state_dict():
    model = BertForMaskedLM(tiny_config())
    masks = StructuredMasks.for_model(model)
    masks.install(model)
    pruned = random_masks(BertForMaskedLM(tiny_config()))
    masks.load_state_dict(pruned.state_dict())
    assert masks.counts() == {"hidden": 16, "heads": 2, "ffn": 24}
    torch.testing.assert_close(masks.kept_indices("hidden"), pruned.kept_indices("hidden"))


# ----------------------------------------------------------------- non-finite gradients
def _grad_steps(pruner: Pruner, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for _, p in pruner.params:
            p.grad = torch.randn(p.shape, generator=generator)
        pruner.accumulate()


def test_non_finite_gradients_skip_the_importance_update():
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config())
    reference = Pruner(model, target=TARGET)
    _grad_steps(reference, 50)
    expected = {n: reference.importance.score(n).clone() for n, _ in reference.params}

    torch.manual_seed(0)
    pruner = Pruner(BertForMaskedLM(tiny_config()), target=TARGET)
    for i, (_, p) in enumerate(pruner.params):  # an overflowed fp16 step: one inf gradient
        p.grad = torch.zeros_like(p)
        if i == 3:
            p.grad.view(-1)[0] = float("inf")
    pruner.accumulate()
    _grad_steps(pruner, 50)
    for name, _ in pruner.params:
        score = pruner.importance.score(name)
        assert torch.isfinite(score).all()
        torch.testing.assert_close(score, expected[name], rtol=0, atol=0)
    assert pruner.skipped_updates == 1
    state = pruner.extra_state()
    again = Pruner(BertForMaskedLM(tiny_config()), target=TARGET)
    again.load_extra_state(state)
    assert again.skipped_updates == 1


def test_nan_scores_never_outrank_finite_ones_nor_restore_pruned_entries():
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    scores = torch.tensor([float("nan"), 2.0, 1.0, 3.0, 5.0])
    _keep_top(mask, scores, 3)
    assert mask.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    scores = torch.full((5,), float("nan"))
    _keep_top(mask, scores, 2)
    assert mask.sum() == 2 and mask[0] == 0 and mask[4] == 0


# --------------------------------------------------------------- windowed PLATON scores
def test_windowed_scores_on_a_two_window_example():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    importance = PlatonImportance(beta1=0.5, beta2=0.5, window=True)
    # Window 1: s = [1, 2] and [3, 0], mean [2, 1]: Ī = [1, .5], Ū = |[2, 1] − Ī| / 2 = [.5, .25].
    for grad in ([1.0, -1.0], [3.0, 0.0]):
        param.grad = torch.tensor(grad)
        importance.update([("w", param)])
        assert importance.score("w") is None  # nothing folded inside a window
    importance.end_window()
    torch.testing.assert_close(importance.sensitivity["w"], torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(importance.uncertainty["w"], torch.tensor([0.5, 0.25]))
    # Window 2: s = [0, 4] and [2, 2], mean [1, 3]: Ī = [1, 1.75],
    # Ū = [.5, .25] / 2 + |[1, 3] − [1, 1.75]| / 2 = [.25, .75]; score = Ī · Ū.
    for grad in ([0.0, -2.0], [2.0, 1.0]):
        param.grad = torch.tensor(grad)
        importance.update([("w", param)])
    importance.end_window()
    torch.testing.assert_close(importance.score("w"), torch.tensor([0.25, 1.3125]))
    importance.end_window()  # an empty window changes nothing
    torch.testing.assert_close(importance.score("w"), torch.tensor([0.25, 1.3125]))


def test_pruner_closes_score_windows_at_mask_update_steps():
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config())
    pruner = Pruner(model, target=TARGET, update_interval=3, score_window=True)
    by_hand = PlatonImportance(window=True)
    generator = torch.Generator().manual_seed(0)
    # Steps as the training hooks run them: gradients and accumulate() for step t, then
    # update() with the step count after the optimizer step (t + 1).
    for step in range(6):
        for _, p in pruner.params:
            p.grad = torch.randn(p.shape, generator=generator)
        pruner.accumulate()
        by_hand.update(pruner.params)
        pruner.update(step + 1, 100)  # warm-up until step 10: no mask change
        if (step + 1) % 3 == 0:
            by_hand.end_window()
        name = pruner.params[0][0]
        assert (pruner.importance.score(name) is None) == (step < 2)
    for name, _ in pruner.params:
        torch.testing.assert_close(pruner.importance.score(name), by_hand.score(name))
    # The open window travels with checkpoints.
    pruner.accumulate()
    again = Pruner(BertForMaskedLM(tiny_config()), target=TARGET, score_window=True)
    again.load_extra_state(pruner.extra_state())
    assert again.importance.window_steps == pruner.importance.window_steps
    first = pruner.params[0][0]
    torch.testing.assert_close(
        again.importance.window_sum[first], pruner.importance.window_sum[first]
    )


def test_homotopic_config_carries_score_window_off():
    conf = OmegaConf.load(f"{CONF_DIR}/pruning/homotopic.yaml")
    assert conf.score_window is False
