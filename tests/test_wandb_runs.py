"""One W&B run per training run: each multirun job and pipeline stage, failed or resumed.

Everything is offline (tests/conftest.py sets WANDB_MODE=offline). What W&B recorded is read
back from each run's transaction log (``run-<id>.wandb``) with W&B's own reader,
``wandb leet inspect --json``: W&B 0.31 writes no ``files/config.yaml`` or summary file
offline, the log is the record ``wandb sync`` uploads.
"""

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import wandb
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import kdlab.train
from kdlab.pipeline import run_pipeline
from kdlab.rundir import RunDir, choose_run_id
from tests.conftest import CONF_DIR, SUBPROCESS_ENV, fast_overrides, run_cli
from tests.helpers import Interrupted
from tests.test_homodistil import data  # noqa: F401 (the pruning run's fixture)
from tests.test_pruning_callback import pruned_run

WANDB = [
    "logger=wandb",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "eval.speed_batches=0",
]
# A pipeline of two stages given on the command line, as experiment=demo has it: a teacher
# fine-tuned, then distilled into the student.
PIPELINE = (
    "pipeline={teacher:['method=finetune'],"
    "student:['method=kd','teacher.path=${stage:teacher}/student']}"
)


@dataclass
class OfflineRun:
    """What one start of a W&B run recorded offline (one ``offline-run-<time>-<id>``)."""

    path: Path
    id: str
    group: str
    job_type: str
    tags: list[str]
    start_time: str
    exit_code: int | None = None
    config: dict = field(default_factory=dict)  # W&B's merged config, without "_wandb"
    config_updates: int = 0  # records that logged kdlab's config (seed and all)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    @property
    def state(self) -> str:
        return {None: "unfinished", 0: "finished"}.get(self.exit_code, "failed")

    def logged(self, key: str) -> list:
        """The values of ``key`` in the run's history, in order."""
        return [row[key] for row in self.history if key in row]

    def steps_of(self, key: str) -> list[int]:
        """The trainer steps at which ``key`` was logged."""
        return [row["trainer/global_step"] for row in self.history if key in row]


def read_offline_run(path: Path) -> OfflineRun:
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0 and "No such command" in proc.stderr:
        pytest.skip(f"wandb {wandb.__version__} has no `wandb leet inspect`")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    (start,) = [r["run"] for r in records if r["type"] == "run"]
    run = OfflineRun(
        path=path,
        id=start["run_id"],
        group=start.get("run_group", ""),
        job_type=start.get("job_type", ""),
        tags=start.get("tags", []),
        start_time=start["start_time"],
    )
    for record in records:
        kind = record["type"]
        if kind == "config":
            update = record["config"].get("update", {})
            run.config.update({k: v for k, v in update.items() if k != "_wandb"})
            run.config_updates += "seed" in update
        elif kind == "summary":
            run.summary.update(record["summary"].get("update", {}))
        elif kind == "history":
            run.history.append(record["history"]["item"])
        elif kind == "exit":
            run.exit_code = record["exit"].get("exit_code", 0)
    return run


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """Every start of a W&B run in ``run_dir``, in the order they started."""
    runs = [read_offline_run(p) for p in RunDir(run_dir).wandb_dir.glob("offline-run-*")]
    return sorted(runs, key=lambda r: r.start_time)


def stored_id(run_dir: Path) -> str:
    return RunDir(run_dir).run_id.read_text().strip()


def sync_dry_run(paths: list[Path]) -> str:
    """What ``wandb sync`` would upload from ``paths`` (``--dry-run``: no network)."""
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "sync", "--dry-run", *map(str, paths)],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def cli_overrides(tmp_path, glue_root, teacher_dir) -> list[str]:
    return [
        o
        for o in fast_overrides(tmp_path, glue_root, teacher_dir)
        if not o.startswith(("run_dir=", "logger="))
    ]


# ---------------------------------------------------------------------------------- sweep
def test_each_multirun_job_has_its_own_wandb_run(tmp_path, glue_root, teacher_dir):
    sweep = tmp_path / "sweep_kd"
    proc = run_cli(
        [
            "-m",
            *cli_overrides(tmp_path, glue_root, teacher_dir),
            *WANDB,
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already in progress" not in proc.stderr
    job_dirs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("-")[-1] for p in job_dirs] == ["seed1", "seed2"]
    ids = []
    for seed, job_dir in zip((1, 2), job_dirs, strict=True):
        (run,) = offline_runs(job_dir)
        config = OmegaConf.load(RunDir(job_dir).config)
        metrics = json.loads(RunDir(job_dir).metrics.read_text())
        ids.append(run.id)
        assert run.id == stored_id(job_dir) == config.run_id
        assert run.path.name.endswith(f"-{run.id}")
        assert run.state == "finished"
        # Its own job's config, logged once.
        assert run.config_updates == 1
        assert run.config["seed"] == seed and run.config["run_dir"] == str(job_dir)
        assert run.config["logger"]["id"] == run.id
        assert run.group == sweep.name and run.job_type == "kd"
        assert {"sst2", "bert_L2_H128", "kd", f"seed{seed}"} <= set(run.tags)
        # The summary holds the best checkpoint's metrics and the teacher's.
        assert run.summary["best/val/accuracy"] == metrics["student"]["val/accuracy"]
        assert run.summary["teacher/val/loss"] == metrics["teacher"]["val/loss"]
        # Charts: the loss terms, the learning rate and the step time.
        assert len(run.logged("train/loss")) == 2 and len(run.logged("train/kd")) == 2
        assert run.logged("lr-AdamW/pg1") and all(t > 0 for t in run.logged("train/step_time_s"))
    assert len(set(ids)) == 2
    # `wandb sync` finds both runs from the sweep directory's job folders.
    out = sync_dry_run([RunDir(d).wandb_dir for d in job_dirs])
    assert "Would sync 2 run(s)" in out and all(i in out for i in ids)


# ------------------------------------------------------------------------------- pipeline
def test_each_pipeline_stage_has_its_own_wandb_run(tmp_path, glue_root, teacher_dir):
    root = tmp_path / "pipe"
    proc = run_cli(
        [
            *cli_overrides(tmp_path, glue_root, teacher_dir),
            *WANDB,
            PIPELINE,
            f"hydra.run.dir={root}",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher, student = (offline_runs(root / stage) for stage in ("teacher", "student"))
    assert len(teacher) == len(student) == 1
    teacher, student = teacher[0], student[0]
    assert (teacher.job_type, student.job_type) == ("teacher", "student")
    assert teacher.group == student.group == root.name
    assert teacher.id == stored_id(root / "teacher") != student.id == stored_id(root / "student")
    assert teacher.config["method"]["name"] == "finetune"
    assert student.config["method"]["name"] == "kd"
    assert student.config["teacher"]["path"] == str(root / "teacher" / "student")
    metrics = json.loads(RunDir(root / "student").metrics.read_text())
    assert student.summary["teacher/val/accuracy"] == metrics["teacher"]["val/accuracy"]
    assert teacher.state == student.state == "finished"


def test_a_sweep_job_pipeline_is_grouped_within_its_sweep(tmp_path, glue_root, teacher_dir):
    # What main() hands run_pipeline in a multirun job: run_group already set to the sweep.
    job_dir = tmp_path / "sweep_x" / "3-pipeline-job"
    overrides = [*cli_overrides(tmp_path, glue_root, teacher_dir), PIPELINE]
    stages = {}
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        try:
            cfg.run_dir, cfg.run_group = str(job_dir), "sweep_x"
            # A stand-in run that records the stage's config and returns no metrics.
            run_pipeline(
                cfg, lambda stage_cfg: stages.setdefault(stage_cfg.job_type, stage_cfg) and {}
            )
        finally:
            HydraConfig.instance().cfg = None
    assert list(stages) == ["teacher", "student"]
    for name, stage_cfg in stages.items():
        assert stage_cfg.run_group == "sweep_x/3-pipeline-job"
        assert stage_cfg.logger.group == "sweep_x/3-pipeline-job"
        assert stage_cfg.logger.job_type == name and stage_cfg.run_dir == str(job_dir / name)


# ------------------------------------------------------------------- failure and resuming
INTERRUPTED = [
    "trainer.max_epochs=2",
    "+callbacks.interrupt._target_=tests.helpers.StopAfterEpoch",
    "+callbacks.interrupt.epoch=0",
]


def test_a_failed_run_finishes_failed_and_the_next_run_is_new(make_cfg, tmp_path):
    failed_dir, next_dir = tmp_path / "failed", tmp_path / "next"
    with pytest.raises(Interrupted):
        kdlab.train.run(make_cfg(extra=[*WANDB, *INTERRUPTED], run_dir=failed_dir))
    assert wandb.run is None
    (failed,) = offline_runs(failed_dir)
    assert failed.state == "failed" and failed.exit_code != 0

    kdlab.train.run(make_cfg(extra=[*WANDB, "seed=7"], run_dir=next_dir))
    assert wandb.run is None
    (run,) = offline_runs(next_dir)
    assert run.id != failed.id and run.state == "finished"
    assert run.config["seed"] == 7 and run.config["run_dir"] == str(next_dir)
    assert offline_runs(failed_dir) == [failed]  # nothing more went into the failed run


def test_a_resumed_run_continues_its_wandb_run(make_cfg, tmp_path):
    with pytest.raises(Interrupted):
        kdlab.train.run(make_cfg(extra=[*WANDB, *INTERRUPTED]))
    run_dir = tmp_path / "run"
    first_id = stored_id(run_dir)
    kdlab.train.run(make_cfg(extra=[*WANDB, "trainer.max_epochs=2", "ckpt_path=last"]))
    interrupted, resumed = offline_runs(run_dir)
    assert interrupted.id == resumed.id == first_id == stored_id(run_dir)
    assert (interrupted.state, resumed.state) == ("failed", "finished")
    # Each start logged its own epoch's two batches (Lightning's steps 0, 1 and 2, 3).
    assert interrupted.steps_of("train/loss") == [0, 1]
    assert resumed.steps_of("train/loss") == [2, 3]
    # `wandb sync` uploads both files into the one run, in the order they started.
    out = sync_dry_run([RunDir(run_dir).wandb_dir])
    assert "Would sync 2 run(s)" in out


def test_run_id_is_new_unless_the_run_resumes(tmp_path):
    run_dir = RunDir(tmp_path)
    first = choose_run_id(run_dir, resuming=False)
    assert stored_id(tmp_path) == first
    assert choose_run_id(run_dir, resuming=True) == first
    second = choose_run_id(run_dir, resuming=False)  # afresh in the same directory
    assert second != first and stored_id(tmp_path) == second
    (tmp_path / "other").mkdir()  # resuming a checkpoint of another run: no stored id
    third = choose_run_id(RunDir(tmp_path / "other"), resuming=True)
    assert third not in (first, second) and stored_id(tmp_path / "other") == third


# -------------------------------------------------------------------------------- pruning
def test_a_pruning_run_logs_its_curves_and_plot(data, tmp_path):  # noqa: F811
    pruned_run(data, tmp_path, "logger=wandb")
    (run,) = offline_runs(tmp_path)
    history = json.loads(RunDir(tmp_path).pruning_history.read_text())
    assert run.logged("prune/remaining") == [row["remaining"] for row in history]
    assert run.logged("prune/params") == [float(row["params"]) for row in history]
    assert run.logged("prune/kl") == [row["kl"] for row in history]
    assert run.logged("prune/skipped_updates") == [0.0] * len(history)
    # One image (Lightning's log_image logs a list of them), stored among the run's files.
    assert run.logged("prune/history._type") == ["images/separated"]
    assert run.logged("prune/history.format") == ["png"]
    ((name,),) = run.logged("prune/history.filenames")
    assert name.startswith("media/images/prune/history")
    media = run.path / "files" / name
    assert media.read_bytes() == RunDir(tmp_path).pruning_plot.read_bytes()
