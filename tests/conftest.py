"""Shared fixtures: tiny teachers, GLUE-layout TSV fixtures, and a Hydra ``compose`` helper."""

import os
import subprocess
import sys
from pathlib import Path

# The hub libraries read these when imported: set them before anything imports them, so
# that hub look-ups fail at once instead of retrying an unreachable network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
# Tiny models on 2 shared cores: one thread per process avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import kdlab.train  # noqa: E402
from kdlab.components import build, target_of  # noqa: E402
from kdlab.models.build import load_tokenizer  # noqa: E402
from tests.fixtures import write_glue, write_tiny_bert  # noqa: E402

CONF_DIR = kdlab.train.CONF_DIR


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No hub, no W&B service, no shared data root leaking into the tests."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("KDLAB_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def glue_root(tmp_path_factory) -> Path:
    """All nine GLUE tasks, small, in the official TSV layout."""
    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny random BERT with a 2-class head (stands in for a fine-tuned teacher)."""
    return write_tiny_bert(tmp_path_factory.mktemp("teacher2"), num_labels=2)


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory, teacher_dir) -> dict[int, Path]:
    """Tiny teachers by number of labels (1 = regression)."""
    return {
        2: teacher_dir,
        1: write_tiny_bert(tmp_path_factory.mktemp("teacher1"), num_labels=1),
        3: write_tiny_bert(tmp_path_factory.mktemp("teacher3"), num_labels=3),
    }


def compose(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` (outside ``@hydra.main``)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def _head_and_labels(cfg: DictConfig) -> dict:
    head = target_of(cfg, "task").head
    labels = cfg.task.get("labels") if head == "sequence_classification" else None
    return {"head": head, "labels": None if labels is None else list(labels)}


def build_student(cfg: DictConfig):
    """The student ``cfg.model`` describes, for ``cfg.task``'s head, as a run builds it."""
    return build(cfg, "model", **_head_and_labels(cfg))


def build_teacher(cfg: DictConfig, needs_head: bool = True, hint: str = ""):
    """The teacher ``cfg.teacher`` describes, for ``cfg.task``'s head, as a run builds it."""
    return build(
        cfg,
        "teacher",
        task=cfg.task.name,
        needs_head=needs_head,
        hint=hint,
        **_head_and_labels(cfg),
    )


def build_task(task: DictConfig, tokenizer, seed: int = 0, **options):
    """The datamodule of a composed ``task`` node, with ``options`` overriding its keys."""
    return instantiate(task, tokenizer=tokenizer, seed=seed, **options)


def build_datamodule(cfg: DictConfig, tokenizer=None, seed: int = 0):
    """The datamodule of ``cfg.task`` (with the tokenizer of ``cfg.model`` by default)."""
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.tokenizer, "model.tokenizer")
    return build(cfg, "task", tokenizer=tokenizer, seed=seed)


# A CPU run with CSV logs, no progress bar or sanity validation, a log row every step.
QUIET_CPU_RUN = [
    "logger=csv",
    "callbacks=quiet",
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
]


def fast_overrides(
    tmp: Path,
    glue_root: Path,
    teacher: Path,
    task: str = "sst2",
    method: str = "kd",
    run_dir: Path | None = None,
    model: str | None = None,
) -> list[str]:
    """Overrides for a quick CPU run: tiny teacher, a one-layer 64-wide random student
    (or ``model``), the task's TSV fixture, CSV logger, no progress bar, caches in ``tmp``."""
    from tests.fixtures import GLUE_DIRS

    student = (
        [f"model={model}"]
        if model
        else [
            "model=bert_L2_H128",
            "model.num_layers=1",
            "model.hidden_size=64",
        ]
    )
    return [
        f"method={method}",
        "teacher=local",
        f"teacher.path={teacher}",
        "teacher.name=tiny",
        *student,
        f"task={task}",
        *([f"task.data_dir={glue_root / GLUE_DIRS[task]}"] if task in GLUE_DIRS else []),
        f"task.cache_dir={tmp / 'cache'}",
        "task.batch_size=8",
        "task.eval_batch_size=16",
        "task.max_seq_length=32",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "logger=csv",
        "callbacks=quiet",
        "eval.speed_batches=1",
        f"run_dir={run_dir or tmp / 'run'}",
    ]


@pytest.fixture
def make_cfg(tmp_path, glue_root, teacher_dirs):
    """``make_cfg(task=..., method=..., model=..., extra=[...])`` composes a fast test config."""

    def make(
        task: str = "sst2", method: str = "kd", extra=(), run_dir=None, model=None
    ) -> DictConfig:
        num_labels = {"stsb": 1, "mnli": 3}.get(task, 2)
        base = fast_overrides(
            tmp_path, glue_root, teacher_dirs[num_labels], task, method, run_dir, model
        )
        return compose([*base, *extra])

    return make


# Subprocesses of `python -m kdlab.train` must find the tests package (tests.helpers) and
# this checkout's kdlab, whichever kdlab is installed; one torch thread each, as in-process.
REPO_ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]),
    "OMP_NUM_THREADS": "1",
}


def run_cli(overrides: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m kdlab.train <overrides>`` in a subprocess, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "kdlab.train", *overrides],
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def captured(monkeypatch):
    """Records the LightningModule that ``kdlab.train.run`` builds (``captured["module"]``)
    and a copy of its student's initial weights (``captured["initial_student"]``)."""
    box: dict = {}
    original = kdlab.train.build

    def build(cfg, key, **runtime):
        component = original(cfg, key, **runtime)
        if key == "method":
            box["module"] = component
            box["initial_student"] = {
                k: v.detach().clone() for k, v in component.student.state_dict().items()
            }
        return component

    monkeypatch.setattr(kdlab.train, "build", build)
    return box
