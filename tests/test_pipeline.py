"""Pipelines: stages run in order, finished stages are skipped, unfinished ones resume."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities import rank_zero_only

import kdlab.pipeline
from kdlab.pipeline import run_stage
from kdlab.rundir import RunDir
from tests.conftest import REPO_ROOT, SUBPROCESS_ENV, fast_overrides, run_cli

STAGES = {
    "teacher": ["method=finetune"],
    "student": ["method=kd", "teacher.path=${stage:teacher}/student"],
    "tuned": ["method=finetune", "model=pretrained", "model.path=${stage:student}/student"],
}


def write_experiment(conf_dir: Path, name: str, stages: dict[str, list[str]]) -> None:
    """A pipeline experiment under ``conf_dir/experiment`` (passed with --config-dir): one
    epoch unless a stage says otherwise (a command-line value would be refused there)."""
    lines = ["# @package _global_", "trainer:", "  max_epochs: 1", "pipeline:"]
    for stage, overrides in stages.items():
        lines.append(f"  {stage}: [{', '.join(repr(o) for o in overrides)}]")
    (conf_dir / "experiment").mkdir(parents=True, exist_ok=True)
    (conf_dir / "experiment" / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def pipeline_overrides(tmp_path: Path, glue_root: Path, teacher_dir: Path) -> list[str]:
    """The tiny model and data of a pipeline's command line (the stages set the method)."""
    return [
        o
        for o in fast_overrides(tmp_path, glue_root, teacher_dir, model="bert_tiny")
        if not o.startswith(("run_dir=", "method=", "trainer.max_epochs="))
    ]


@pytest.fixture
def pipeline(tmp_path, glue_root, teacher_dir):
    """``pipeline(name, stages)`` runs that pipeline in ``tmp_path/run`` and returns the
    finished process; the command line also sets the tiny model and data."""
    conf = tmp_path / "conf"
    base = pipeline_overrides(tmp_path, glue_root, teacher_dir)

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
    logged = second.stdout + second.stderr
    assert "already finished" in logged and "other settings" not in logged  # the same command
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


def run_slurm_tasks(overrides: list[str], tasks: int, out: Path, timeout: float = 300) -> list[str]:
    """``python -m kdlab.train <overrides>`` as the ``tasks`` tasks of a one-node SLURM job,
    each with the environment srun gives it (Lightning's ``SLURMEnvironment`` makes them the
    ranks); returns each task's output. Fails, stopping the others, once a task fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": str(tasks),
        "SLURM_NTASKS_PER_NODE": str(tasks),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    outputs = [out / f"task{rank}.out" for rank in range(tasks)]
    procs = []
    for rank, output in enumerate(outputs):
        env = {**SUBPROCESS_ENV, **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
        with open(output, "w") as f:
            command = [sys.executable, "-m", "kdlab.train", *overrides]
            procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=f, stderr=f))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if any(codes) or None not in codes:
                break
            time.sleep(1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [output.read_text() for output in outputs]
    failed = [
        f"task {r} exited with {p.returncode}:\n{texts[r][-2000:]}"
        for r, p in enumerate(procs)
        if p.returncode
    ]
    assert not failed, "\n".join(failed)
    return texts


# Several processes for tens of seconds: in the slow suite, as the other cluster checks.
@pytest.mark.slow
def test_a_pipeline_on_slurm_keeps_its_ranks_together(tmp_path, glue_root, teacher_dir):
    """A 2-stage pipeline as the 2 tasks of a SLURM job (gloo), each running the whole
    pipeline: rank 1 waits for rank 0 to export stage 'teacher' before stage 'student' reads
    it. (It went on at once and failed on the teacher path, leaving rank 0 waiting for it.)
    Rank 0 alone records the job (.hydra/, train.log) and writes and prints the summaries;
    run again, the finished pipeline is skipped as quietly by rank 1."""
    conf = tmp_path / "conf"
    write_experiment(conf, "two", {stage: STAGES[stage] for stage in ("teacher", "student")})
    run_dir = tmp_path / "run"
    overrides = [
        "--config-dir",
        str(conf),
        "experiment=two",
        *pipeline_overrides(tmp_path, glue_root, teacher_dir),
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.precision=32-true",
        "eval.speed_batches=0",
        f"hydra.run.dir={run_dir}",
    ]
    first = run_slurm_tasks(overrides, 2, tmp_path)
    assert [(r["stage"], r["ran"]) for r in summary(tmp_path)] == [
        ("teacher", True),
        ("student", True),
    ]
    job = RunDir(run_dir)
    assert job.hydra_config.is_file()
    assert [log.name for log in job.job_logs] == ["train.log", "train_ddp_process_1.log"]
    waited = "Stage 'teacher': waiting for rank 0"
    assert waited in (run_dir / "train_ddp_process_1.log").read_text()
    assert waited not in (run_dir / "train.log").read_text()
    # Each stage's summary table says where the student went.
    assert [output.count("exported student:") for output in first] == [2, 0]

    second = run_slurm_tasks(overrides, 2, tmp_path)
    assert [r["ran"] for r in summary(tmp_path)] == [False, False]
    assert [output.count("exported student:") for output in second] == [2, 0]


def test_ranks_other_than_0_go_on_with_rank_0_or_stop_with_it(tmp_path, monkeypatch):
    """Rank 0 records a stage that raised in its error.txt; a rank waiting for the stage's
    metrics.json stops on it, and goes on once metrics.json appears."""
    run_dir = RunDir(tmp_path / "teacher")

    def export_fails(stage_cfg):
        raise MemoryError("out of memory while exporting")

    with pytest.raises(MemoryError):
        run_stage("teacher", None, run_dir, export_fails)
    assert "MemoryError: out of memory while exporting" in run_dir.error.read_text()

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    monkeypatch.setattr(kdlab.pipeline, "POLL_INTERVAL_S", 0.01)
    with pytest.raises(RuntimeError, match=r"Stage 'teacher' failed on rank 0 \(see .*error.txt"):
        run_stage("teacher", None, run_dir, lambda stage_cfg: {})

    run_dir.error.unlink()
    threading.Timer(0.5, run_dir.metrics.write_text, ["{}"]).start()
    started = time.monotonic()
    assert run_stage("teacher", None, run_dir, lambda stage_cfg: {}) == {}
    assert time.monotonic() - started >= 0.5


# --- Issue 18: a reused finished stage names the settings that differ (i18-inputs) --------


def test_a_finished_stage_reused_with_other_overrides_names_them(
    tmp_path, glue_root, teacher_dir, monkeypatch, caplog
):
    import logging
    from types import SimpleNamespace

    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from kdlab.rundir import save_config
    from tests.conftest import CONF_DIR

    base = [*pipeline_overrides(tmp_path, glue_root, teacher_dir), "method=finetune"]

    def fake_run(stage_cfg):
        # What a finished stage leaves: config.yaml (with its run id) and metrics.json.
        run_dir = RunDir(stage_cfg.run_dir)
        run_dir.path.mkdir(parents=True)
        stage_cfg.run_id = "first"
        stage_cfg.trainer.accumulate_grad_batches = 1
        save_config(stage_cfg, run_dir)
        metrics = {"main_metric": "accuracy", "method": "finetune"}
        metrics["student"] = {"name": "tiny", "params": 1}
        run_dir.metrics.write_text(json.dumps(metrics))
        return metrics

    def invoke(*extra: str) -> str:
        command = OmegaConf.create([*base, *extra])
        hydra = SimpleNamespace(overrides=SimpleNamespace(task=command))
        monkeypatch.setattr(kdlab.pipeline.HydraConfig, "get", lambda: hydra)
        cfg = kdlab.pipeline.stage_config([*base, *extra], str(tmp_path / "run"), {}, "", "x")
        cfg.pipeline = {"only": ["trainer.max_epochs=1"]}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kdlab.pipeline"):
            kdlab.pipeline.run_pipeline(cfg, fake_run)
        return " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        assert invoke() == ""  # the first invocation runs the stage
        assert invoke() == ""  # the same overrides: skipped without a warning
        warning = invoke("optim.lr=0.001", "task.batch_size=4")
    assert "Stage 'only' already finished" in warning
    assert "optim.lr: 5e-05 → 0.001; task.batch_size: 8 → 4" in warning
    assert "run_id" not in warning and "overwrite=true" in warning


# --- Issue 21: a deploy stage ends a pipeline (i21-deploy) ---------------------------------

DEPLOY_STAGES = {
    "teacher": ["method=finetune"],
    "student": ["method=kd", "teacher.path=${stage:teacher}/student"],
    "deploy": [
        "deploy=onnx",
        "deploy.model=${stage:student}/student",
        "deploy.reference=${stage:teacher}/student",
        "deploy.prune_vocab=true",
        "deploy.runs=1",
        "deploy.warmup=0",
    ],
}


def test_a_deploy_stage_ends_a_pipeline(pipeline, tmp_path):
    """The stage deploys the student (int8, pruned to the task's vocabulary) beside the
    teacher, evaluated on the stage's own task, and files it as a finished stage whose row is
    the int8 model's."""
    first = pipeline("deployed", DEPLOY_STAGES)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run"
    record = json.loads((RunDir(run / "deploy").deploy / "deploy.json").read_text())
    model = record["model"]
    assert model["source"] == str(RunDir(run / "student").student)
    assert record["reference"]["source"] == str(RunDir(run / "teacher").student)
    assert record["reference"]["eval"] is None  # its own stage evaluated it
    assert model["vocabulary"]["kept_tokens"] < model["vocabulary"]["tokens_before"]
    student = json.loads(RunDir(run / "student").metrics.read_text())["student"]
    # The stage's task is the training stages': kdlab's evaluation gives the same figure.
    assert model["eval"]["task"] == "sst2"
    assert model["eval"]["pytorch"]["val/accuracy"] == pytest.approx(student["val/accuracy"])

    rows = summary(tmp_path)
    assert [(r["stage"], r["method"], r["ran"]) for r in rows] == [
        ("teacher", "finetune", True),
        ("student", "kd", True),
        ("deploy", "deploy", True),
    ]
    deployed = rows[-1]["deployed"]
    int8_file = RunDir(run / "deploy").deploy / "model_int8.onnx"
    assert deployed["runtime"] == "onnx_int8" and deployed["bytes"] == int8_file.stat().st_size
    timed = {
        (r["model"], r["runtime"], r["batch"], r["threads"]): r["ms"]
        for r in record["latency"]["rows"]
    }
    assert deployed["ms"] == timed["model", "onnx_int8", 32, "all"]
    assert rows[-1]["val"] == model["eval"]["onnx_int8"]["val/accuracy"]
    assert rows[-1]["params"] == model["parameters"] < student["params"]  # pruned vocabulary
    assert rows[0]["deployed"] is None
    assert "ms / batch 32" in first.stdout and "deploy (done before)" not in first.stdout
    # Its table: the int8 student beside the PyTorch teacher, with the teacher stage's figures.
    metrics = json.loads(RunDir(run / "deploy").metrics.read_text())
    teacher = json.loads(RunDir(run / "teacher").metrics.read_text())["student"]
    assert metrics["teacher"]["val/accuracy"] == teacher["val/accuracy"]
    # ... and its size: the trained teacher's, not its vocabulary-pruned copy's.
    assert metrics["teacher"]["params"] == teacher["params"] > record["reference"]["parameters"]
    assert metrics["student"]["name"] == "bert_tiny, onnx int8"
    assert metrics["inference"]["student_ms_per_batch"] == deployed["ms"]


def test_a_bad_deploy_stage_is_refused_before_any_stage_runs(pipeline, tmp_path):
    bad = {**DEPLOY_STAGES, "deploy": [*DEPLOY_STAGES["deploy"], "deploy.runs=0"]}
    proc = pipeline("bad_deploy", bad)
    assert proc.returncode != 0
    assert "deploy.runs=0 must be >= 1" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "teacher").exists()
