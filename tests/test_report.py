"""``kdlab.report`` on run directories written here (config.yaml + metrics.json), and a real
multirun sweep with a failing job ending with its report and a non-zero exit."""

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from kdlab import report
from kdlab.rundir import RunDir
from kdlab.summary import pipeline_table, summary_table, table_console
from kdlab.sweep import SweepSummary
from tests.conftest import REPO_ROOT, SUBPROCESS_ENV, fast_overrides, run_cli

SWEEP = "multirun/2026-01-01_00-00-00"
# (task, method, alpha) -> validation accuracy of seeds 1, 2, 3; None: that seed's run did
# not finish (see _write_sweep).
VAL = {
    ("sst2", "finetune", None): [0.80, 0.82, 0.84],
    ("sst2", "kd", 0.5): [0.85, 0.86, 0.90],
    ("sst2", "kd", 0.9): [0.88, 0.88, 0.88],
    ("rte", "finetune", None): [0.60, 0.64, 0.62],
    ("rte", "kd", 0.5): [0.66, 0.70, 0.68],
    ("rte", "kd", 0.9): [0.61, None, None],
}
# SST-2 runs also have a test split: test accuracy of seeds 1, 2, 3.
TEST = {
    ("sst2", "finetune", None): [0.79, 0.81, 0.86],
    ("sst2", "kd", 0.5): [0.84, 0.85, 0.89],
    ("sst2", "kd", 0.9): [0.87, 0.87, 0.87],
}
SPEEDUP = [2.0, 2.2, 2.4]


def _write_run(
    run_dir: Path,
    task: str,
    method: str,
    seed: int,
    student: dict | None,
    model: str = "bert3",
    main_metric: str = "accuracy",
    alpha: float | None = None,
    teacher_path: str = "/teachers/minilm",
    overrides: list[str] | None = None,
    selected: bool = False,
) -> Path:
    """A run directory as kdlab.train leaves it: the resolved config, and metrics.json when
    ``student`` (the student's metrics) is given; ``selected``: evaluated at the best
    checkpoint by the validation main metric (the default callbacks' model_checkpoint)."""
    run_dir.mkdir(parents=True)
    method_cfg = {"_target_": f"kdlab.methods.{method}", "name": method}
    if alpha is not None:
        method_cfg |= {"alpha": alpha, "temperature": 2.0}
    config = {
        "seed": seed,
        "run_dir": str(run_dir),
        "ckpt_path": None,
        "task": {
            "name": task,
            "main_metric": main_metric,
            "metrics": [main_metric],
            "train_fraction": 1.0,
        },
        "method": method_cfg,
        "model": {"name": model, "num_layers": 3},
        "teacher": {"name": "minilm", "path": teacher_path},
        "optim": {"lr": 5e-5, "betas": [0.9, 0.999]},
        # Per-run values that must not become columns.
        "logger": {"name": f"{task}-{method}-{model}-seed{seed}", "save_dir": str(run_dir)},
        "callbacks": {"last_checkpoint": {"dirpath": f"{run_dir}/checkpoints"}},
    }
    if selected:
        config["callbacks"]["model_checkpoint"] = {
            "dirpath": f"{run_dir}/checkpoints",
            "filename": "best",
            "monitor": f"val/{main_metric}",
        }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if overrides is not None:
        RunDir(run_dir).hydra_dir.mkdir()
        RunDir(run_dir).hydra_overrides.write_text(yaml.safe_dump(overrides))
    if student is not None:
        metrics = {
            "task": task,
            "method": method,
            "main_metric": main_metric,
            "student": {"name": model, "path": str(run_dir / "student"), **student},
            "teacher": None,
            "wall_time_s": 1.0,
        }
        if selected:
            metrics["best_checkpoint"] = f"{run_dir}/checkpoints/best.ckpt"
        if method == "kd":
            metrics["teacher"] = {"name": "minilm", "params": 2_000_000}
            metrics["inference"] = {"speedup": SPEEDUP[seed - 1]}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def _write_sweep(root: Path) -> Path:
    """2 tasks x 2 methods x 3 seeds, kd swept over method.alpha; of rte/kd/alpha=0.9, seed 2
    is unfinished (a checkpoint at step 7) and seed 3 failed (a traceback in its job log)."""
    sweep = root / SWEEP
    num = 0
    for (task, method, alpha), values in VAL.items():
        for seed, val in enumerate(values, start=1):
            job = sweep / f"{num}-{task}-{method}-bert3-seed{seed}"
            overrides = [f"task={task}", f"method={method}", f"seed={seed}"]
            if alpha is not None:
                overrides.append(f"method.alpha={alpha}")
            student = None
            if val is not None:
                student = {"params": 1_000_000 if method == "finetune" else 500_000}
                student["val/accuracy"] = val
                student["val/loss"] = 0.5
                if (task, method, alpha) in TEST:
                    student["test/accuracy"] = TEST[(task, method, alpha)][seed - 1]
            _write_run(job, task, method, seed, student, alpha=alpha, overrides=overrides)
            if val is None and seed == 2:
                RunDir(job).checkpoints.mkdir()
                torch.save(
                    {"global_step": 7, "epoch": 0, "state_dict": {}}, RunDir(job).last_checkpoint
                )
            if val is None and seed == 3:
                (job / "train.log").write_text(
                    "[2026-01-01 00:00:01][kdlab][INFO] - Task rte: train 48\n"
                    "Traceback (most recent call last):\n"
                    '  File "kdlab/train.py", line 101, in run\n'
                    "    trainer.fit(module)\n"
                    "RuntimeError: CUDA out of memory\n"
                )
            num += 1
    return sweep


@pytest.fixture
def sweep_report(tmp_path) -> report.Report:
    _write_sweep(tmp_path)
    return report.build_report(tmp_path)


def _row(rows, task, method, alpha) -> report.Row:
    alpha_text = "-" if alpha is None else str(alpha)
    (row,) = [
        r
        for r in rows
        if (r.task, r.method, r.extra.get("method.alpha")) == (task, method, alpha_text)
    ]
    return row


def test_collect_runs_finds_every_run_and_its_status(tmp_path):
    _write_sweep(tmp_path)
    records = report.collect_runs(tmp_path)
    assert len(records) == 18
    # Job directories in job order (10 after 9), whatever their depth under the root.
    assert [int(r.path.name.split("-")[0]) for r in records] == list(range(18))
    by_status = {
        s: [r for r in records if r.status == s] for s in ("finished", "failed", "unfinished")
    }
    assert len(by_status["finished"]) == 16
    (failed,) = by_status["failed"]
    assert (failed.task, failed.method, failed.seed) == ("rte", "kd", 3)
    assert failed.detail == "RuntimeError: CUDA out of memory"
    (unfinished,) = by_status["unfinished"]
    assert (unfinished.task, unfinished.seed, unfinished.last_step) == ("rte", 2, 7)
    assert "step 7" in unfinished.detail
    assert unfinished.overrides == ["task=rte", "method=kd", "seed=2", "method.alpha=0.9"]


def test_varying_key_is_the_swept_one(sweep_report):
    # Not the seed, not per-run paths or names (run_dir, logger.*, callbacks.*.dirpath), not
    # what follows the method (method._target_, method.temperature exist for kd only).
    assert sweep_report.keys == ["method.alpha"]


def test_means_stds_and_counts(sweep_report):
    rows = [r for r in sweep_report.rows if r.task != report.GLUE_ROW]
    assert len(rows) == 6
    assert [(r.task, r.method, r.extra["method.alpha"]) for r in rows] == [
        ("sst2", "finetune", "-"),
        ("sst2", "kd", "0.5"),
        ("sst2", "kd", "0.9"),
        ("rte", "finetune", "-"),
        ("rte", "kd", "0.5"),
        ("rte", "kd", "0.9"),
    ]
    # By hand: mean, then sample std sqrt(sum of squared deviations / (n - 1)).
    expected = {
        ("sst2", "finetune", None): (0.82, math.sqrt((0.02**2 + 0 + 0.02**2) / 2), 3),
        ("sst2", "kd", 0.5): (0.87, math.sqrt((0.02**2 + 0.01**2 + 0.03**2) / 2), 3),
        ("sst2", "kd", 0.9): (0.88, 0.0, 3),
        ("rte", "finetune", None): (0.62, math.sqrt((0.02**2 + 0.02**2 + 0) / 2), 3),
        ("rte", "kd", 0.5): (0.68, 0.02, 3),
        ("rte", "kd", 0.9): (0.61, None, 1),  # seed 2 unfinished, seed 3 failed
    }
    for (task, method, alpha), (mean, std, n) in expected.items():
        row = _row(rows, task, method, alpha)
        assert row.metric == "accuracy"
        assert row.val.mean == pytest.approx(mean)
        assert row.val.n == n
        if std is None:
            assert row.val.std is None
        else:
            assert row.val.std == pytest.approx(std, abs=1e-12)
    test = _row(rows, "sst2", "finetune", None).test
    assert test.mean == pytest.approx(0.82)
    assert test.std == pytest.approx(math.sqrt((0.03**2 + 0.01**2 + 0.04**2) / 2))
    assert test.n == 3
    assert _row(rows, "rte", "kd", 0.5).test is None
    kd = _row(rows, "sst2", "kd", 0.5)
    assert kd.params == 500_000 and kd.speedup == pytest.approx(2.2)
    assert kd.seeds == [1, 2, 3]
    assert _row(rows, "sst2", "finetune", None).speedup is None
    # Two tasks are no GLUE.
    assert not [r for r in sweep_report.rows if r.task == report.GLUE_ROW]


def test_metric_option_reports_another_metric(tmp_path):
    _write_sweep(tmp_path)
    rows = report.build_report(tmp_path, metric="loss").rows
    assert {r.metric for r in rows} == {"loss"}
    assert _row(rows, "sst2", "kd", 0.5).val.mean == pytest.approx(0.5)
    assert _row(rows, "sst2", "kd", 0.5).test is None


def test_markdown_csv_and_png(sweep_report, tmp_path):
    out = tmp_path / "out"
    written = report.write_report(sweep_report, out)
    assert written == {
        "markdown": out / "report.md",
        "csv": out / "report.csv",
        "plot": out / "report.png",
    }

    markdown = (out / "report.md").read_text()
    assert "| task | method | model | method.alpha | metric | val | n | test |" in markdown
    assert (
        "| sst2 | finetune | bert3 | - | accuracy | 0.8200 ± 0.0200 | 3 | 0.8200 ± 0.0361 |"
        in markdown
    )
    assert "| rte | kd | bert3 | 0.9 | accuracy | 0.6100 | 1 | - |" in markdown
    incomplete = markdown.split("## Failed and unfinished runs")[1]
    assert (
        "| failed | rte | kd | bert3 | 3 | 0.9 | RuntimeError: CUDA out of memory |" in incomplete
    )
    assert "| unfinished | rte | kd | bert3 | 2 | 0.9 | last checkpoint at step 7 |" in incomplete
    assert f"{SWEEP}/16-rte-kd-bert3-seed2" in incomplete

    with (out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    kd = next(
        r for r in rows if (r["task"], r["method"], r["method.alpha"]) == ("sst2", "kd", "0.5")
    )
    assert float(kd["val_mean"]) == pytest.approx(0.87)
    assert float(kd["val_std"]) == pytest.approx(math.sqrt(0.0014 / 2))
    assert int(kd["val_n"]) == 3 and float(kd["speedup"]) == pytest.approx(2.2)
    one = next(
        r for r in rows if (r["task"], r["method"], r["method.alpha"]) == ("rte", "kd", "0.9")
    )
    assert one["val_std"] == "" and one["val_n"] == "1" and one["test_mean"] == ""

    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


GLUE_SEED1 = {
    # task: (main metric, metrics of seed 1) and the task's GLUE score by hand
    "cola": ("matthews", {"val/matthews": 0.50, "val/accuracy": 0.80}),  # 0.50
    "sst2": ("accuracy", {"val/accuracy": 0.90}),  # 0.90
    "mrpc": ("f1", {"val/f1": 0.88, "val/accuracy": 0.84}),  # 0.86
    "qqp": ("f1", {"val/f1": 0.80, "val/accuracy": 0.86}),  # 0.83
    "stsb": ("pearson", {"val/pearson": 0.85, "val/spearman": 0.83}),  # 0.84
    "mnli": ("accuracy", {"val/accuracy": 0.80, "val_mm/accuracy": 0.82}),  # 0.81
    "qnli": ("accuracy", {"val/accuracy": 0.87}),  # 0.87
    "rte": ("accuracy", {"val/accuracy": 0.65}),  # 0.65
    "wnli": ("accuracy", {"val/accuracy": 0.56}),  # 0.56
}


def _write_glue(root: Path, selected_task: str | None = None) -> None:
    """kd on all nine GLUE tasks, finetune on all but WNLI, seeds 1 and 2; the runs of
    ``selected_task`` are evaluated at checkpoints selected on their validation set."""
    for task, (main, metrics) in GLUE_SEED1.items():
        for seed in (1, 2):
            # Seed 2 scores 0.02 higher on every metric.
            student = {k: v + 0.02 * (seed - 1) for k, v in metrics.items()} | {"params": 10}
            for method in ("kd", "finetune"):
                if method == "finetune" and task == "wnli":
                    continue
                _write_run(
                    root / method / f"{task}-{seed}",
                    task,
                    method,
                    seed,
                    student,
                    main_metric=main,
                    selected=task == selected_task,
                )


def test_glue_average_over_nine_tasks(tmp_path):
    # finetune has eight tasks only: no GLUE row.
    _write_glue(tmp_path)
    rows = report.build_report(tmp_path).rows
    (glue,) = [r for r in rows if r.task == report.GLUE_ROW]
    assert (glue.method, glue.model, glue.metric) == ("kd", "bert3", report.GLUE_METRIC)
    seed1 = (0.50 + 0.90 + 0.86 + 0.83 + 0.84 + 0.81 + 0.87 + 0.65 + 0.56) / 9
    seed2 = seed1 + 0.02
    assert glue.val.mean == pytest.approx((seed1 + seed2) / 2)
    assert glue.val.std == pytest.approx(0.02 / math.sqrt(2))
    assert glue.val.n == 2 and glue.test is None
    assert glue.speedup == pytest.approx(2.1) and glue.params == 10
    assert rows[-1] is glue
    # The per-task rows keep each task's main metric.
    mrpc = next(r for r in rows if (r.task, r.method) == ("mrpc", "kd"))
    assert mrpc.metric == "f1" and mrpc.val.mean == pytest.approx(0.89)
    markdown = report.write_markdown(report.build_report(tmp_path), tmp_path / "r.md").read_text()
    assert f"| GLUE | kd | bert3 | GLUE score | {seed1 + 0.01:.4f} ± 0.0141 | 2 |" in markdown


def test_glue_without_wnli_over_eight_tasks(tmp_path):
    _write_glue(tmp_path)
    rows = report.build_report(tmp_path).rows
    averages = [r for r in rows if r.task in report.GLUE_AVERAGES]
    # After the tasks: the no-WNLI average of both methods, then the nine-task one of kd.
    assert [(r.task, r.method) for r in averages] == [
        (report.GLUE_NO_WNLI_ROW, "finetune"),
        (report.GLUE_NO_WNLI_ROW, "kd"),
        (report.GLUE_ROW, "kd"),
    ]
    assert rows[-3:] == averages
    # By hand: the mean of the eight task scores (MRPC, QQP, STS-B, MNLI: their two metrics'
    # mean), WNLI's 0.56 left out.
    seed1 = (0.50 + 0.90 + 0.86 + 0.83 + 0.84 + 0.81 + 0.87 + 0.65) / 8
    for row in averages[:2]:
        assert row.metric == report.GLUE_METRIC
        assert row.val.mean == pytest.approx(seed1 + 0.01)
        assert row.val.std == pytest.approx(0.02 / math.sqrt(2))
        assert row.val.n == 2 and row.seeds == [1, 2] and row.test is None
    assert averages[2].val.mean == pytest.approx((seed1 * 8 + 0.56) / 9 + 0.01)
    markdown = report.write_markdown(report.build_report(tmp_path), tmp_path / "r.md").read_text()
    assert (
        f"| GLUE (no WNLI) | finetune | bert3 | GLUE score | {seed1 + 0.01:.4f} ± 0.0141 | 2 |"
        in markdown
    )
    assert "GLUE (no WNLI): the same over the eight tasks other than WNLI" in markdown


def test_dev_figures_of_checkpoints_selected_on_dev_are_marked(tmp_path):
    # RTE's runs are evaluated at the checkpoint with the best val/accuracy; the others as
    # training left them.
    _write_glue(tmp_path, selected_task="rte")
    rep = report.build_report(tmp_path)
    marked = {(r.task, r.method) for r in rep.rows if r.selected_on_val}
    # Every average holds RTE.
    assert marked == {("rte", "kd"), ("rte", "finetune")} | {
        (average, method)
        for average in report.GLUE_AVERAGES
        for method in ("kd", "finetune")
        if (average, method) != (report.GLUE_ROW, "finetune")
    }
    markdown = report.write_markdown(rep, tmp_path / "r.md").read_text()
    assert "| rte | kd | bert3 | accuracy | 0.6600 ± 0.0141 † | 2 |" in markdown
    assert "| sst2 | kd | bert3 | accuracy | 0.9100 ± 0.0141 | 2 |" in markdown
    assert "\n† validation figures of checkpoints selected on that same validation set" in (
        markdown
    )
    with report.write_csv(rep, tmp_path / "r.csv").open() as f:
        selected = {(r["task"], r["method"]): r["selected_on_val"] for r in csv.DictReader(f)}
    assert selected[("rte", "kd")] == "True" and selected[("sst2", "kd")] == "False"
    caption = report.report_tables(rep)[0].caption
    assert "† validation figures of checkpoints selected" in caption
    # Without the marked runs: no marker, no note.
    unmarked = report.build_report(tmp_path / "kd" / "sst2-1")
    assert not unmarked.rows[0].selected_on_val
    assert "†" not in report.report_tables(unmarked)[0].caption


def test_pipeline_stages_at_depth_and_their_own_teacher(tmp_path):
    """A pipeline's stages are runs; each student's teacher.path is its own pipeline's
    teacher stage, which is no varying key."""
    for seed, (teacher_acc, student_acc) in enumerate([(0.80, 0.76), (0.82, 0.78)], start=1):
        root = tmp_path / "outputs" / "rotten_tomatoes" / f"demo-{seed}"
        RunDir(root).hydra_dir.mkdir(parents=True)
        RunDir(root).hydra_overrides.write_text(yaml.safe_dump(["experiment=demo", f"seed={seed}"]))
        _write_run(
            root / "teacher",
            "rotten_tomatoes",
            "finetune",
            seed,
            {"val/accuracy": teacher_acc, "params": 9},
            model="minilm",
        )
        _write_run(
            root / "student",
            "rotten_tomatoes",
            "kd",
            seed,
            {"val/accuracy": student_acc, "params": 5},
            teacher_path=str(root / "teacher" / "student"),
        )
    rep = report.build_report(tmp_path)
    assert rep.keys == []
    assert [(r.method, r.model, round(r.val.mean, 6), r.val.n) for r in rep.rows] == [
        ("finetune", "minilm", 0.81, 2),
        ("kd", "bert3", 0.77, 2),
    ]
    assert rep.records[0].overrides == ["experiment=demo", "seed=1"]


def test_failed_pipeline_stage_and_job_that_never_wrote_its_config(tmp_path):
    job = tmp_path / "0-sst2-kd-bert3-seed1"
    RunDir(job).hydra_dir.mkdir(parents=True)
    RunDir(job).hydra_overrides.write_text(yaml.safe_dump(["seed=1"]))
    _write_run(job / "teacher", "sst2", "finetune", 1, {"val/accuracy": 0.8, "params": 9})
    _write_run(job / "student", "sst2", "kd", 1, None)
    RunDir(job).error.write_text(
        "overrides: seed=1\n\nTraceback (most recent call last):\n  x\nValueError: bad\n"
    )
    never = tmp_path / "1-sst2-kd-bert3-seed2"
    RunDir(never).hydra_dir.mkdir(parents=True)
    RunDir(never).hydra_config.write_text(
        yaml.safe_dump(
            {
                "seed": 2,
                "run_dir": "${hydra:runtime.output_dir}",
                "task": {"name": "sst2"},
                "method": {"name": "kd"},
                "model": {"name": "bert3"},
            }
        )
    )
    records = report.collect_runs(tmp_path)
    assert [(r.path.relative_to(tmp_path).as_posix(), r.status) for r in records] == [
        ("0-sst2-kd-bert3-seed1/student", "failed"),
        ("0-sst2-kd-bert3-seed1/teacher", "finished"),
        ("1-sst2-kd-bert3-seed2", "unfinished"),
    ]
    assert records[0].detail == "ValueError: bad"
    assert (records[2].task, records[2].seed, records[2].resolved) == ("sst2", 2, False)


def test_cli_writes_the_report_and_fails_without_runs(tmp_path, capsys):
    _write_sweep(tmp_path / "runs")
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "report.md",
        "report.csv",
        "report.png",
    }
    assert "failed and unfinished runs" in capsys.readouterr().out

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "kdlab.report", str(tmp_path / "empty")],
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "no runs under" in proc.stderr and "config.yaml" in proc.stderr
    assert report.main([str(tmp_path / "missing")]) != 0


def _job_config(tmp_path: Path, mode: RunMode) -> DictConfig:
    return OmegaConf.create(
        {
            "hydra": {
                "mode": mode,
                "runtime": {"output_dir": str(tmp_path)},
                "job": {"num": 0},
                "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
            }
        }
    )


@pytest.mark.parametrize("mode", [RunMode.RUN, RunMode.MULTIRUN])
def test_failed_job_leaves_error_txt(tmp_path, mode):
    """A failed single run stays failed for Hydra (which reports it and exits 1); a failed
    sweep job is handed over to SweepSummary so that the sweep goes on."""
    try:
        raise ValueError("boom")
    except ValueError as err:
        error = err
    job_return = JobReturn(overrides=["seed=3"], status=JobStatus.FAILED)
    job_return.return_value = error
    callback = SweepSummary()
    callback.on_job_end(_job_config(tmp_path, mode), job_return)
    text = RunDir(tmp_path).error.read_text()
    assert text.startswith("overrides: seed=3") and "ValueError: boom" in text
    if mode == RunMode.RUN:
        assert job_return.status == JobStatus.FAILED
    else:
        assert job_return.status == JobStatus.COMPLETED and job_return.return_value is None
    # A new attempt in the same directory starts without the old error.
    callback.on_job_start(_job_config(tmp_path, mode), task_function=None)
    assert not RunDir(tmp_path).error.exists()


def test_multirun_names_failed_job_and_exits_non_zero(tmp_path, glue_root, teacher_dir):
    """seed=1,2,3 where the seed=2 job raises: the sweep still runs seed 3, writes its report
    and names the failed job; the process exits non-zero."""
    sweep = tmp_path / "sweep"
    overrides = [
        o
        for o in fast_overrides(tmp_path, glue_root, teacher_dir, "sst2", "kd")
        if not o.startswith("run_dir=")
    ]
    proc = run_cli(
        [
            "-m",
            *overrides,
            "trainer.limit_train_batches=2",
            "+callbacks.fail._target_=tests.helpers.FailWhen",
            "+callbacks.fail.value=${seed}",
            "+callbacks.fail.fail_value=2",
            "seed=1,2,3",
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == [f"{i}-sst2-kd-bert_L2_H128-seed{i + 1}" for i in range(3)]
    assert RunDir(sweep / jobs[0]).finished and RunDir(sweep / jobs[2]).finished
    failed = RunDir(sweep / jobs[1])
    assert not failed.finished
    assert "RuntimeError: simulated failure of the seed=2 job" in failed.error.read_text()
    assert "1 of 3 jobs failed" in output
    assert str(failed.path) in output and "seed=2" in output
    assert "Traceback (most recent call last)" in failed.job_logs[0].read_text()

    markdown = (sweep / "report.md").read_text()
    assert "| sst2 | kd | bert_L2_H128 | accuracy |" in markdown
    assert "| 2 |" in markdown  # seeds 1 and 3
    # Evaluated at the best checkpoint by val/accuracy, as kdlab.train does by default.
    assert " † | 2 |" in markdown and "† validation figures of checkpoints selected" in markdown
    assert "| failed | sst2 | kd | bert_L2_H128 | 2 | RuntimeError: simulated failure" in markdown
    assert (sweep / "report.csv").is_file() and (sweep / "report.png").is_file()


def test_one_pipelines_seed_stages_share_a_row(tmp_path):
    """Every stage of a pipeline carries the map of all stage directories (``stage_dirs``),
    in which its own entry reads ``<run>``: that bookkeeping makes no column, so the seeds of
    each baseline of one pipeline average into one row, told apart by the key that differs."""
    root = tmp_path / "pd_baselines"
    sizes = {"small": 8000, "all": None}
    names = [(size, seed) for size in sizes for seed in (1, 2, 3)]
    stage_dirs = {
        f"basic_{size}_s{seed}": str(root / f"basic_{size}_s{seed}") for size, seed in names
    }
    accuracies = [0.70, 0.72, 0.74, 0.80, 0.82, 0.84]
    for (size, seed), acc in zip(names, accuracies, strict=True):
        run = _write_run(
            root / f"basic_{size}_s{seed}",
            "sst2",
            "finetune",
            seed,
            {"val/accuracy": acc, "params": 5},
        )
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["task"]["max_train_samples"] = sizes[size]
        (run / "config.yaml").write_text(yaml.safe_dump(config | {"stage_dirs": stage_dirs}))
    rep = report.build_report(root)
    assert rep.keys == ["task.max_train_samples"]
    rows = {r.extra["task.max_train_samples"]: (round(r.val.mean, 6), r.val.n) for r in rep.rows}
    assert rows == {"8000": (0.72, 3), "null": (0.82, 3)}


def test_tables_whole_when_output_is_no_terminal(tmp_path, capsys):
    """In a log file (here: captured output) rich would wrap at 80 columns, breaking paths
    and squeezing columns: the tables of the end of a run and of a report print whole."""
    root = tmp_path / ("a-directory-with-a-long-name-" * 3) / "runs"
    _write_sweep(root)
    assert report.main([str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for text in (
        f"{root}: 16 finished, 1 failed, 1 unfinished",
        f"{SWEEP}/16-rte-kd-bert3-seed2",
        "RuntimeError: CUDA out of memory",
        "mean ± sample std over the runs (seeds) of each row",
    ):
        assert any(text in line for line in lines), text

    student = str(root / "0-sst2-finetune-bert3-seed1" / "student")
    metrics = {
        "main_metric": "accuracy",
        "student": {"name": "bert3", "path": student, "params": 17_400_000, "val/accuracy": 0.8},
    }
    stage = {"stage": "student", "method": "kd", "model": "bert3", "main_metric": "accuracy"}
    stage |= {"val": 0.8, "test": None, "params": 5, "wall_time_s": 3.0, "ran": True}
    console = table_console()
    console.print(summary_table("kd", metrics))
    console.print(pipeline_table(f"pipeline {root}", [stage]))
    lines = capsys.readouterr().out.splitlines()
    assert any(f"exported student: {student}" in line for line in lines)
    assert any(f"pipeline {root}" in line for line in lines)
    assert any("student (bert3)" in line and "17.4M" in line for line in lines)


OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
# The method.alpha Optuna sampled in each trial of _write_search.
ALPHAS = [0.22481491235394074, 0.8164965809277261, 0.12345678901234568, 0.6]


def _write_search(root: Path, values: list, metric: str = "accuracy", mode: str = "max") -> Path:
    """A study of kd's method.alpha as search=kd leaves it: one job directory per trial, whose
    Hydra config names the Optuna sweeper and the trial's job number, and the study's
    optimization_results.yaml. ``values``: each trial's val/<metric>; None: it failed."""
    sweep = root / "search"
    for num, (value, alpha) in enumerate(zip(values, ALPHAS, strict=False)):
        job = sweep / f"{num}-sst2-kd-bert3-seed1"
        student = None if value is None else {f"val/{metric}": value, "params": 5}
        overrides = [f"method.alpha={alpha}"]
        _write_run(
            job, "sst2", "kd", 1, student, main_metric=metric, alpha=alpha, overrides=overrides
        )
        config = yaml.safe_load((job / "config.yaml").read_text())
        config["task"]["main_metric_mode"] = mode
        (job / "config.yaml").write_text(yaml.safe_dump(config))
        hydra = {"mode": "MULTIRUN", "sweeper": {"_target_": OPTUNA}, "job": {"num": num}}
        (RunDir(job).hydra_dir / "hydra.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
        if value is None:
            RunDir(job).error.write_text("Traceback (most recent call last):\n  x\nValueError: x\n")
    best = (max if mode == "max" else min)(v for v in values if v is not None)
    (sweep / "optimization_results.yaml").write_text(
        yaml.safe_dump({"name": "optuna", "best_params": {}, "best_value": best})
    )
    return sweep


def test_float_keys_rounded_in_tables_exact_in_csv(tmp_path):
    rep = report.build_report(_write_search(tmp_path, [0.70, 0.75, 0.71, 0.72]))
    assert rep.keys == ["method.alpha"]
    markdown = report.write_markdown(rep, tmp_path / "r.md").read_text()
    for shown in ("0.2248", "0.8165", "0.1235", "0.6"):
        assert f"| sst2 | kd | bert3 | {shown} | accuracy |" in markdown
    assert "0.22481" not in markdown
    terminal = io.StringIO()
    Console(file=terminal, width=200).print(*report.report_tables(rep))
    assert " 0.2248 " in terminal.getvalue() and "0.22481" not in terminal.getvalue()
    # The CSV is data: the values as the configs hold them.
    with report.write_csv(rep, tmp_path / "r.csv").open() as f:
        alphas = [float(r["method.alpha"]) for r in csv.DictReader(f)]
    assert sorted(alphas) == sorted(ALPHAS)


@pytest.mark.parametrize(
    ("metric", "mode", "values", "best"),
    [
        ("accuracy", "max", [0.70, 0.75, None, 0.72], [0.70, 0.75, 0.75]),
        ("perplexity", "min", [30.0, 25.0, None, 28.0], [30.0, 25.0, 25.0]),
    ],
)
def test_search_report_plots_the_objective_by_trial(
    tmp_path, monkeypatch, metric, mode, values, best
):
    """Optuna's history: each trial's objective by trial number and the best so far (in the
    task's direction), not one bar per trial; a failed trial has no point."""
    rep = report.build_report(_write_search(tmp_path, values, metric, mode))
    (history,) = report.search_history(rep.records)
    assert (history.task, history.method, history.model) == ("sst2", "kd", "bert3")
    assert (history.metric, history.mode) == (f"val/{metric}", mode)
    assert history.trials == [0, 1, 3]
    assert history.values == pytest.approx([v for v in values if v is not None])
    assert history.best == pytest.approx(best)
    # The picture is drawn from those histories.
    drawn = []
    monkeypatch.setattr(
        "kdlab.report.write._plot_histories", lambda axes, histories, root: drawn.append(histories)
    )
    assert report.write_report(rep, tmp_path / "out")["plot"].is_file()
    assert drawn == [[history]]
    # A grid sweep (Hydra's basic sweeper) has no trials: its picture is the bars.
    assert report.search_history(report.build_report(_write_sweep(tmp_path / "grid")).records) == []


# --- Issue 21: deployed size and latency columns (i21-deploy) -------------------------------


def _write_deploy_json(run_dir: Path, int8_bytes: int, ms: float, val: float) -> None:
    """A ``deploy/deploy.json`` as kdlab.deploy writes it (the keys the report reads)."""
    rows = [
        {"model": "model", "runtime": runtime, "batch": batch, "threads": threads, "ms": value}
        for runtime, factor in (("onnx_fp32", 2.0), ("onnx_int8", 1.0))
        for batch, threads, value in ((1, "1", 1.0), (32, "1", 50.0), (32, "all", ms))
        for value in [value * factor]
    ]
    record = {
        "model": {
            "files": {"onnx_fp32": "model.onnx", "onnx_int8": "model_int8.onnx"},
            "bytes": {"onnx_fp32": 4 * int8_bytes, "onnx_int8": int8_bytes},
            "eval": {"onnx_fp32": {"val/accuracy": 0.9}, "onnx_int8": {"val/accuracy": val}},
        },
        "latency": {"seq_len": 64, "runs": 3, "warmup": 1, "rows": rows},
    }
    RunDir(run_dir).deploy.mkdir()
    (RunDir(run_dir).deploy / "deploy.json").write_text(json.dumps(record))


def test_deployed_size_and_latency_columns_where_a_run_has_a_deploy_directory(tmp_path):
    for seed, (size, ms, val) in enumerate([(2_000_000, 10.0, 0.88), (4_000_000, 20.0, 0.86)]):
        run = _write_run(tmp_path / f"kd{seed}", "sst2", "kd", seed + 1, {"val/accuracy": 0.9})
        _write_deploy_json(run, size, ms, val)
    _write_run(tmp_path / "ft", "sst2", "finetune", 1, {"val/accuracy": 0.8, "params": 1})
    rep = report.build_report(tmp_path)
    assert rep.deployed
    kd = next(r for r in rep.rows if r.method == "kd")
    assert kd.deployed_bytes == 3_000_000 and kd.deployed_ms == 15.0  # int8, batch 32, all
    assert kd.deployed_val.mean == pytest.approx(0.87) and kd.deployed_val.n == 2
    written = report.write_report(rep, tmp_path / "out")
    markdown = written["markdown"].read_text()
    assert "| speed-up | ONNX file | ONNX ms / batch 32 | ONNX val |" in markdown
    assert "| 3.0 MB | 15.0 | 0.8700 ± 0.0141 |" in markdown
    (finetune,) = [line for line in markdown.splitlines() if "| finetune |" in line]
    assert finetune.endswith("| - | - | - |")  # no deploy directory: empty cells
    with written["csv"].open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(rows["kd"]["deployed_bytes"]) == 3_000_000
    assert float(rows["kd"]["deployed_ms"]) == 15.0
    assert rows["finetune"]["deployed_bytes"] == rows["finetune"]["deployed_val_mean"] == ""


def test_a_deploy_runs_method_is_deploy(tmp_path):
    run = _write_run(tmp_path / "deploy", "sst2", "kd", 1, {"val/accuracy": 0.88})
    config = yaml.safe_load(RunDir(run).config.read_text())
    RunDir(run).config.write_text(yaml.safe_dump({**config, "deploy": {"int8": True}}))
    assert [r.method for r in report.build_report(tmp_path).rows] == ["deploy"]


def test_no_deployed_columns_without_a_deploy_directory(sweep_report, tmp_path):
    assert not sweep_report.deployed
    written = report.write_report(sweep_report, tmp_path / "out")
    assert "ONNX" not in written["markdown"].read_text()
    assert "deployed_bytes" not in written["csv"].read_text()
