"""``benchmarks/gpu.py`` at smoke scale on the CPU (``--device cpu --tiny``): every figure of
the report is there and consistent, the model FLOPs are the analytic count, HomoDistil's
masks reach the target and compaction keeps the outputs; and the FLOP counter agrees with
PyTorch's own on a training step."""

import json
import statistics
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForSequenceClassification

from benchmarks.common import FlopCounter
from tests.conftest import REPO_ROOT, SUBPROCESS_ENV

TINY_TARGET = {"hidden_size": 64, "num_attention_heads": 1, "intermediate_size": 128}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, str]:
    """The JSON report of one tiny CPU run, and what the script printed."""
    out = tmp_path_factory.mktemp("gpu-bench") / "gpu.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def encoder_flops(layers: int, batch: int, seq: int, hidden: int, ffn: int) -> int:
    """Forward FLOPs of a BERT encoder: projections and FFN, plus the attention products."""
    per_layer = 2 * batch * seq * (4 * hidden**2 + 2 * hidden * ffn) + 4 * batch * seq**2 * hidden
    return layers * per_layer


def classifier_flops(batch: int, hidden: int, labels: int = 2) -> int:
    """Pooler and classifier, on [CLS]."""
    return 2 * batch * (hidden**2 + hidden * labels)


def test_every_figure_is_reported(report):
    data, printed = report
    settings = data["settings"]
    assert settings["tiny"] and settings["precision"] == "bf16-mixed"
    assert data["environment"]["device"] == "cpu"
    assert data["matmul_ceiling_tflops"] > 0
    assert "x3 where the call records gradients" in data["flops_formula"]
    assert set(data["methods"]) == {"kd", "mixkd", "homodistil"}
    for name, figures in data["methods"].items():
        step = figures["step_ms"]
        assert step["n"] == settings["steps"], name  # warm-up and the closing batch left out
        assert step["min"] <= step["median"] <= step["max"]
        assert figures["sequences_per_s"] == pytest.approx(1e3 * settings["batch"] / step["median"])
        flops = figures["model_flops_per_step"]
        assert figures["mfu"] == pytest.approx(
            flops / (step["median"] / 1e3) / (settings["peak_tflops"] * 1e12)
        )
        assert figures["reference_ms"]["n"] == settings["steps"]
        assert figures["ratio_to_reference"]["n"] == settings["steps"]
        assert figures["ratio_to_reference"]["median"] > 0
        assert figures["reference_mfu"] > 0
        assert "peak_memory_bytes" in figures  # None on the CPU: PyTorch counts device memory
        assert figures["peak_memory_bytes"] is None
        assert figures["modes"] == {"student_training": True, "teacher_training": False}
    assert data["methods"]["homodistil"]["pruned_to"] == {"hidden": 64, "heads": 1, "ffn": 128}
    assert data["process_peak_rss_bytes"] > 0 and data["wall_s"] > 0
    lines = printed.splitlines()
    assert lines[-1].startswith("wall time")
    assert "EQUAL" in lines[-2] and "DIFFERENT" not in printed


def test_model_flops_are_the_analytic_count(report):
    data, _ = report
    s, teacher = data["settings"], data["settings"]["teacher"]
    b, t, h, i = s["batch"], s["seq"], teacher["hidden_size"], teacher["intermediate_size"]
    teacher_fwd = encoder_flops(teacher["num_hidden_layers"], b, t, h, i) + classifier_flops(b, h)
    bert6_fwd = encoder_flops(6, b, t, h, i) + classifier_flops(b, h)
    kd, mixkd = data["methods"]["kd"], data["methods"]["mixkd"]
    assert kd["model_flops_per_step"] == teacher_fwd + 3 * bert6_fwd
    assert kd["reference_flops"] == teacher_fwd + 3 * bert6_fwd
    # MixKD (kd_alpha=0): the student on original and mixed inputs, the teacher on mixed.
    assert mixkd["model_flops_per_step"] == teacher_fwd + 2 * 3 * bert6_fwd
    assert mixkd["reference_flops"] == kd["reference_flops"]
    # HomoDistil's student is the teacher at full width (masks keep the matrices' sizes):
    # a teacher forward and a student forward and backward, the MLM heads at the graded
    # positions only (about 15 % of them), as in its reference on the same batch.
    encoder = encoder_flops(teacher["num_hidden_layers"], b, t, h, i)
    mlm_everywhere = 2 * b * t * (h**2 + h * teacher["vocab_size"])
    for figures in (data["methods"]["homodistil"], data["homodistil"]["pruned"]):
        flops = figures["model_flops_per_step"]
        assert 4 * encoder < flops < 4 * (encoder + mlm_everywhere)
    assert (
        data["methods"]["homodistil"]["reference_flops"]
        == (data["methods"]["homodistil"]["model_flops_per_step"])
    )


def test_homodistil_prunes_to_the_target_and_compacts_exactly(report):
    data, _ = report
    homo, steps = data["homodistil"], data["settings"]["homodistil_steps"]
    assert homo["steps"] == steps and homo["warmups"] == [0.1, 0.3]
    assert homo["target"] == TINY_TARGET
    assert homo["final_counts"] == {"hidden": 64, "heads": 1, "ffn": 128}
    runs = {k: homo[k] for k in ("plain_before", "pruned", "plain_after")}
    for figures in runs.values():
        assert figures["step_ms"]["n"] == steps - data["settings"]["warmup"] - 1
        assert figures["peak_memory_bytes"] is None
    # Masks do not shrink the matrices: pruned and plain runs do the same model FLOPs.
    assert len({f["model_flops_per_step"] for f in runs.values()}) == 1
    plain = statistics.mean(runs[k]["step_ms"]["median"] for k in ("plain_before", "plain_after"))
    ratios = homo["ratio_pruned_to_plain"]
    assert ratios["median"] == pytest.approx(runs["pruned"]["step_ms"]["median"] / plain)
    assert set(ratios) == {"median", "mean", "plain_spread_median", "plain_spread_mean"}
    check = homo["compaction"]
    assert check["reached_target"] and check["equal"]
    assert (
        check["max_abs_diff"]
        <= check["tolerance"]
        == pytest.approx(1e-4 * max(1.0, check["max_abs_output"]))
    )
    assert {k: check["compacted_shape"][k] for k in TINY_TARGET} == TINY_TARGET
    assert (
        check["compacted_shape"]["num_hidden_layers"]
        == data["settings"]["teacher"]["num_hidden_layers"]
    )
    assert check["params_compacted"] < check["params_masked"]


def test_the_cache_check_builds_at_the_run_precision(report):
    data, printed = report
    cache, settings = data["teacher_cache"], data["settings"]
    assert cache["status"] == "built"
    # bf16-mixed: float32 weights under bfloat16 autocast, in the key.
    assert cache["key_precision"]["teacher_dtype"] == "float32"
    assert cache["key_precision"]["autocast_dtype"] == "bfloat16"
    assert cache["batches_compared"] == settings["warmup"] + settings["steps"]
    assert cache["within_fp16_bound"] and cache["max_abs_output"] > 0
    assert "within the float16 bound" in printed


def test_flop_counter_matches_pytorch_on_a_training_step():
    """Teacher forward without gradients and student forward and backward: the hook count
    equals ``FlopCounterMode``'s count of the matrix products (eager attention, whose
    products are plain ``bmm``s PyTorch counts, forward and backward)."""

    def bert(layers: int):
        config = BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=64,
            attn_implementation="eager",
        )
        return BertForSequenceClassification(config)

    torch.manual_seed(0)
    teacher, student = bert(3).eval().requires_grad_(False), bert(2).train()
    ids = torch.randint(5, 50, (3, 7))

    def step():
        with torch.no_grad():
            teacher(input_ids=ids)
        student(input_ids=ids).logits.sum().backward()

    with FlopCounterMode(display=False) as pytorch:
        step()
    with FlopCounter(torch.nn.ModuleList([teacher, student])) as hooks:
        step()
    assert hooks.flops == pytorch.get_total_flops() > 0
    with FlopCounter(teacher) as forward_only:
        teacher(input_ids=ids)
    assert forward_only.flops == encoder_flops(3, 3, 7, 32, 64) + classifier_flops(3, 32)
