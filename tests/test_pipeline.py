"""Pipelines: stages run in order, finished stages are skipped, unfinished ones resume."""

import json
import os
from pathlib import Path

import pytest
import torch

from kdlab.rundir import RunDir
from tests.conftest import fast_overrides, run_cli

STAGES = {
    "teacher": ["method=finetune"],
    "student": ["method=kd", "teacher.path=${stage:teacher}/student"],
    "tuned": ["method=finetune", "model=pretrained", "model.path=${stage:student}/student"],
}


def write_experiment(conf_dir: Path, name: str, stages: dict[str, list[str]]) -> None:
    """A pipeline experiment under ``conf_dir/experiment`` (passed with --config-dir)."""
    lines = ["# @package _global_", "pipeline:"]
    for stage, overrides in stages.items():
        lines.append(f"  {stage}: [{', '.join(repr(o) for o in overrides)}]")
    (conf_dir / "experiment").mkdir(parents=True, exist_ok=True)
    (conf_dir / "experiment" / f"{name}.yaml").write_text("\n".join(lines) + "\n")


@pytest.fixture
def pipeline(tmp_path, glue_root, teacher_dir):
    """``pipeline(name, stages)`` runs that pipeline in ``tmp_path/run`` and returns the
    finished process; the command line also sets the tiny model and data."""
    conf = tmp_path / "conf"
    base = [
        o
        for o in fast_overrides(tmp_path, glue_root, teacher_dir, model="bert_tiny")
        if not o.startswith(("run_dir=", "method="))
    ]

    def run(name: str, stages: dict[str, list[str]]):
        write_experiment(conf, name, stages)
        return run_cli(
            [
                "--config-dir",
                str(conf),
                f"experiment={name}",
                *base,
                f"hydra.run.dir={tmp_path / 'run'}",
            ]
        )

    return run


def summary(tmp_path: Path) -> list[dict]:
    return json.loads(RunDir(tmp_path / "run").pipeline_summary.read_text())


def test_a_pipeline_runs_then_skips_then_reruns_only_what_is_missing(pipeline, tmp_path):
    first = pipeline("three", STAGES)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = summary(tmp_path)
    assert [r["stage"] for r in rows] == list(STAGES) and all(r["ran"] for r in rows)
    assert rows[-1]["main_metric"] == "accuracy" and rows[-1]["val"] is not None
    assert "pipeline" in first.stdout and "tuned" in first.stdout
    stamps = {s: os.stat(RunDir(tmp_path / "run" / s).metrics).st_mtime_ns for s in STAGES}

    second = pipeline("three", STAGES)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not any(r["ran"] for r in summary(tmp_path))
    assert {s: os.stat(RunDir(tmp_path / "run" / s).metrics).st_mtime_ns for s in STAGES} == stamps

    RunDir(tmp_path / "run" / "tuned").metrics.unlink()
    third = pipeline("three", STAGES)
    assert third.returncode == 0, third.stderr[-3000:]
    assert [r["ran"] for r in summary(tmp_path)] == [False, False, True]
    for stage in ("teacher", "student"):
        assert os.stat(RunDir(tmp_path / "run" / stage).metrics).st_mtime_ns == stamps[stage]


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(pipeline, tmp_path):
    two = {"teacher": ["method=finetune"], "student": [*STAGES["student"], "trainer.max_epochs=2"]}
    interrupted = {
        **two,
        "student": [
            *two["student"],
            "+callbacks.interrupt._target_=tests.helpers.StopAfterEpoch",
            "+callbacks.interrupt.epoch=0",
        ],
    }
    cut = pipeline("cut", interrupted)
    assert cut.returncode != 0 and "simulated interruption" in cut.stdout + cut.stderr
    student = RunDir(tmp_path / "run" / "student")
    assert student.last_checkpoint.is_file() and not student.finished
    steps = torch.load(student.last_checkpoint, weights_only=True)["global_step"]

    resumed = pipeline("cut", two)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Stage 'student' resumes from its last checkpoint." in resumed.stdout + resumed.stderr
    assert [r["ran"] for r in summary(tmp_path)] == [False, True]
    final = torch.load(student.last_checkpoint, weights_only=True)["global_step"]
    assert final == 2 * steps


def test_an_unknown_stage_names_the_stages(pipeline, tmp_path):
    bad = {
        "teacher": ["method=finetune"],
        "student": ["method=kd", "teacher.path=${stage:teachr}/student"],
    }
    proc = pipeline("bad", bad)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "${stage:teachr} names no stage of this pipeline" in message
    assert "['student', 'teacher']" in message
    assert not (tmp_path / "run" / "teacher" / "checkpoints").exists()  # checked before work
