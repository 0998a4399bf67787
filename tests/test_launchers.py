"""Launchers and search through Hydra's plugins: DDP jobs of a local multirun, the submitit
launchers (local processes; the sbatch script of the SLURM preset), Optuna studies."""

import json
import math
import os
import pickle
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import kdlab.train
from kdlab.errors import NoObjectiveError
from kdlab.rundir import RunDir
from kdlab.sweep import StudyCheck, SweepSummary, rerun_command
from tests.conftest import REPO_ROOT, SUBPROCESS_ENV, fast_overrides, run_cli
from tests.fixtures import write_corpus, write_tiny_mlm_bert

# Short runs: two training batches, no speed timing.
SHORT = ["trainer.limit_train_batches=2", "eval.speed_batches=0"]
# Two gloo processes on the CPU, in fp32.
CPU_DDP = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
]


def sweep_overrides(tmp_path: Path, glue_root: Path, teacher: Path, task: str = "sst2") -> list:
    """``fast_overrides`` for the jobs of a sweep: each job in its own directory."""
    return [
        o
        for o in fast_overrides(tmp_path, glue_root, teacher, task)
        if not o.startswith("run_dir=")
    ]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


# Several processes for tens of seconds: in the slow suite, as the other cluster checks.
@pytest.mark.slow
def test_ddp_multirun_starts_each_job_once_with_its_own_ranks(tmp_path, glue_root, teacher_dir):
    """Two jobs of two gloo processes each. Lightning starts rank 1 by re-running the command
    line: with -m that was the whole sweep again, in another directory."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            *sweep_overrides(tmp_path, glue_root, teacher_dir),
            *SHORT,
            *CPU_DDP,
            "+callbacks.rank._target_=tests.helpers.RecordRank",
            "+callbacks.rank.seed=${seed}",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert output.count("Launching 2 jobs") == 1  # rank 1 started no sweep of its own
    jobs = job_dirs(sweep)
    assert [p.name for p in jobs] == [f"{i}-sst2-kd-bert_L2_H128-seed{i + 1}" for i in range(2)]
    ranks = {}
    for seed, job in enumerate(jobs, start=1):
        records = {p.stem: json.loads(p.read_text()) for p in job.glob("rank*.json")}
        assert set(records) == {"rank0", "rank1"}
        assert all(r["world_size"] == 2 and r["seed"] == seed for r in records.values())
        ranks[seed] = records
        # Rank 1's Hydra log is in the job's directory, which holds the job's run alone.
        assert (job / "train_ddp_process_1.log").is_file()
        assert RunDir(job).finished
        assert OmegaConf.load(RunDir(job).config).seed == seed
    # Rank 0 of both jobs is the sweep's process; each job started a rank 1 of its own.
    assert ranks[1]["rank0"]["pid"] == ranks[2]["rank0"]["pid"]
    assert len({ranks[1]["rank1"]["pid"], ranks[2]["rank1"]["pid"], ranks[1]["rank0"]["pid"]}) == 3


# Several processes for tens of seconds: in the slow suite, as the other cluster checks.
@pytest.mark.slow
def test_a_failed_ddp_job_leaves_no_process_group_to_the_next(tmp_path, glue_root, teacher_dir):
    """Two DDP jobs in the sweep's process: the first fails once its process group is up, the
    second sets up a group of its own with a new rank 1. (A group left alive made Lightning
    skip the setup: the second job ran on the first's group, whose rank 1 had exited.)"""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            *sweep_overrides(tmp_path, glue_root, teacher_dir),
            *SHORT,
            *CPU_DDP,
            "+callbacks.fail._target_=tests.helpers.FailWhen",
            "+callbacks.fail.value=${seed}",
            "+callbacks.fail.fail_value=1",
            "+callbacks.rank._target_=tests.helpers.RecordRank",
            "+callbacks.rank.seed=${seed}",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]  # the sweep names its failed job
    failed, good = (RunDir(job) for job in job_dirs(sweep))
    assert "simulated failure of the seed=1 job" in failed.error.read_text()
    assert good.finished and not good.error.exists(), output[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in good.path.glob("rank*.json")}
    assert set(records) == {"rank0", "rank1"}
    assert all(r["world_size"] == 2 and r["seed"] == 2 for r in records.values())


# Several processes for tens of seconds: in the slow suite, as the other cluster checks.
@pytest.mark.slow
def test_local_launcher_runs_each_job_in_a_submitit_process(tmp_path, glue_root, teacher_dir):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            *sweep_overrides(tmp_path, glue_root, teacher_dir),
            *SHORT,
            "hydra/launcher=local",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = job_dirs(sweep)
    assert [p.name for p in jobs] == [f"{i}-sst2-kd-bert_L2_H128-seed{i + 1}" for i in range(2)]
    # What each submitit process handed back to the sweep: Hydra's JobReturn, whose value is
    # the job's objective.
    results = sorted((sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2
    returned = {}
    for path in results:
        outcome, job_return = pickle.loads(path.read_bytes())
        assert outcome == "success" and job_return.status == JobStatus.COMPLETED
        returned[job_return.overrides[-1]] = job_return.return_value
    for seed, job in enumerate(jobs, start=1):
        metrics = json.loads(RunDir(job).metrics.read_text())
        assert returned[f"seed={seed}"] == metrics["student"]["val/accuracy"]


# Several processes for tens of seconds: in the slow suite, as the other cluster checks.
@pytest.mark.slow
def test_a_killed_local_job_is_a_failed_job_with_a_rerun_command_that_works(
    tmp_path, glue_root, teacher_dir
):
    """A submitit job killed by a signal hands back no result: the sweep still reports, names
    it as failed and exits 1 (it ended in a raw UncompletedJobError), and its printed command
    finishes it in the sweep's job directory."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            *sweep_overrides(tmp_path, glue_root, teacher_dir),
            *SHORT,
            "hydra/launcher=local",
            "+callbacks.kill._target_=tests.helpers.KillOnce",
            "+callbacks.kill.value=${seed}",
            "+callbacks.kill.kill_value=1",
            f"+callbacks.kill.marker={tmp_path / 'killed'}",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "UncompletedJobError" not in output.split("jobs failed")[-1]
    killed, good = (RunDir(job) for job in job_dirs(sweep))
    assert good.finished and not killed.finished
    assert "has not produced any output" in killed.error.read_text()  # submitit's words
    assert (sweep / "report.md").is_file()
    assert "1 of 2 jobs failed" in output
    lines = output.splitlines()
    command = shlex.split(lines[lines.index(f"  {killed.path}") + 1])
    # Killed before its first checkpoint, after its config.yaml: that run is replaced.
    assert command[-2:] == ["overwrite=true", f"hydra.run.dir={killed.path}"]
    assert "ckpt_path=last" not in command
    rerun = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert killed.finished
    assert OmegaConf.load(killed.config).seed == 1


@pytest.mark.parametrize(
    ("left", "how"),
    [
        ("checkpoint", ["ckpt_path=last"]),  # resumes from what it wrote
        ("config", ["overwrite=true"]),  # stopped before its first checkpoint
        ("nothing", []),  # never started
    ],
)
def test_a_rerun_command_resumes_only_what_the_job_wrote(tmp_path, left, how):
    job = RunDir(tmp_path / "job")
    job.checkpoints.mkdir(parents=True)
    if left == "checkpoint":
        job.last_checkpoint.write_bytes(b"")
    if left != "nothing":
        job.config.write_text("seed: 1\n")
    else:
        job.checkpoints.rmdir()
    # The sweep was resumed (ckpt_path=last) after an interruption.
    command = rerun_command(job.path, ["seed=1", "ckpt_path=last", "task.name='a b'"])
    assert command == [
        "python",
        "-m",
        "kdlab.train",
        "seed=1",
        "task.name='a b'",
        *how,
        f"hydra.run.dir={job.path}",
    ]


FAKE_SBATCH = """#!/bin/sh
# Records its arguments; submits nothing.
echo "$@" > "{record}"
echo "Submitted batch job 4242"
"""


def test_slurm_preset_requests_what_the_trainer_uses(tmp_path, glue_root, teacher_dir):
    """The sbatch script of one job: 2 nodes x 2 GPUs, one task per GPU (the trainer's
    devices and num_nodes), the partition, time, memory and CPUs asked for. The fake sbatch
    submits nothing, so the sweep would wait for ever: it is stopped once submitit has filed
    the script under the job id sbatch answered."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch_args"
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(record=record))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; never run
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    sweep = tmp_path / "sweep"
    overrides = [
        "-m",
        *sweep_overrides(tmp_path, glue_root, teacher_dir),
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=90",
        "hydra.launcher.mem_gb=32",
        "hydra.launcher.cpus_per_task=4",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**SUBPROCESS_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    submission = sweep / ".submitit" / "4242" / "4242_submission.sh"
    with subprocess.Popen(
        [sys.executable, "-m", "kdlab.train", *overrides],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        deadline = time.monotonic() + 120
        while not submission.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
    assert submission.exists(), output[-3000:]
    # sbatch was given this very script (submitit leaves a link where it first wrote it).
    (argument,) = record.read_text().split()
    assert Path(argument).resolve() == submission.resolve()
    lines = submission.read_text().splitlines()
    sbatch_flags = {line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH")}
    assert {
        "--partition=gpu",
        "--nodes=2",
        "--gpus-per-node=2",
        "--ntasks-per-node=2",
        "--cpus-per-task=4",
        "--mem=32GB",
        "--time=90",
    } <= sbatch_flags
    # Each task (one per GPU) runs the job through submitit, and Lightning's SLURMEnvironment
    # makes the tasks its ranks.
    (command,) = [line for line in lines if line.startswith("srun ")]
    assert command.endswith(f"-u -m submitit.core._submit {sweep}/.submitit/%j")


@pytest.mark.parametrize(("devices", "mem_gb"), [(1, 32), (8, 256)])
def test_slurm_preset_asks_memory_per_rank(devices, mem_gb):
    with initialize_config_dir(config_dir=kdlab.train.CONF_DIR, version_base="1.3"):
        overrides = ["hydra/launcher=slurm", "trainer=ddp", f"trainer.devices={devices}"]
        cfg = hydra_compose("train", overrides, return_hydra_config=True)
    assert cfg.hydra.launcher.mem_gb == mem_gb  # per node


@pytest.mark.parametrize(
    ("procid", "job_name"),
    [(None, "train"), ("0", "train"), ("3", "train_ddp_process_3")],
)
def test_slurm_tasks_leave_the_job_record_to_rank_0(monkeypatch, procid, job_name):
    """Every SLURM task runs the job in one directory: task 0 writes .hydra/ and train.log,
    the others no .hydra/ and a log of their own (named as Lightning names its ranks').
    Hydra writes neither itself: kdlab.train.JobFiles does, once the run has claimed the
    directory, .hydra/ on rank 0 alone (test_a_pipeline_on_slurm_keeps_its_ranks_together)."""
    if procid is not None:
        monkeypatch.setenv("SLURM_PROCID", procid)
    with initialize_config_dir(config_dir=kdlab.train.CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("train", ["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.output_subdir is None
    assert list(cfg.hydra.job_logging.root.handlers) == ["console"]
    assert cfg.hydra.job.name == job_name  # the job log is <job name>.log


def optuna_overrides(tmp_path, glue_root, teacher_dirs, corpus, mlm_teacher, mode) -> list:
    """A 3-trial study of a tiny run: KD on STS-B (Pearson, better higher) or MLM on a
    corpus (perplexity, better lower)."""
    common = [*SHORT, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    if mode == "max":
        return [
            *sweep_overrides(tmp_path, glue_root, teacher_dirs[1], "stsb"),
            "search=kd",
            *common,
        ]
    return [
        *[
            o
            for o in sweep_overrides(tmp_path, glue_root, teacher_dirs[2])
            if not o.startswith(("task", "model", "method"))
        ],
        "search=mlm",
        "task=corpus/local",
        f"task.files=[{corpus}/*.txt]",
        "task.max_seq_length=16",
        "task.batch_size=8",
        "task.validation_fraction=0.2",
        "task.max_train_samples=32",
        f"task.cache_dir={tmp_path / 'cache'}",
        "model=pretrained",
        f"model.path={mlm_teacher}",
        *common,
    ]


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root / "corpus"), write_tiny_mlm_bert(root / "mlm")


@pytest.mark.parametrize(("mode", "metric"), [("max", "pearson"), ("min", "perplexity")])
def test_optuna_study_returns_its_best_trial(
    mode, metric, tmp_path, glue_root, teacher_dirs, corpus_data
):
    proc = run_cli(optuna_overrides(tmp_path, glue_root, teacher_dirs, *corpus_data, mode))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert f"Directions: ['{mode}imize']" in output
    sweep = tmp_path / "sweep"
    values = []
    for job in job_dirs(sweep):
        values.append(json.loads(RunDir(job).metrics.read_text())["student"][f"val/{metric}"])
    assert len(values) == 3 and len(set(values)) == 3  # the trials differ
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == (max(values) if mode == "max" else min(values))
    assert set(best.best_params) >= {"optim.lr"}


def test_optuna_study_goes_on_after_a_failed_trial_and_names_it(
    tmp_path, glue_root, teacher_dirs, corpus_data
):
    overrides = optuna_overrides(tmp_path, glue_root, teacher_dirs, *corpus_data, "max")
    proc = run_cli(
        [
            *overrides,
            "+callbacks.fail._target_=tests.helpers.FailWhen",
            "+callbacks.fail.value=${hydra:job.num}",
            "+callbacks.fail.fail_value=1",
            "+callbacks.fail.name=trial",
        ]
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]  # the sweep names its failed trial
    sweep = tmp_path / "sweep"
    jobs = job_dirs(sweep)
    assert len(jobs) == 3
    failed = RunDir(jobs[1])
    assert "simulated failure of the trial=1 job" in failed.error.read_text()
    assert "1 of 3 jobs failed" in output and str(failed.path) in output
    values = [
        json.loads(RunDir(j).metrics.read_text())["student"]["val/pearson"] for j in jobs[::2]
    ]
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_value == max(values)


def _sweep_job_config(tmp_path: Path, sweeper: str) -> DictConfig:
    return OmegaConf.create(
        {
            "task": {"main_metric": "accuracy"},
            "hydra": {
                "mode": RunMode.MULTIRUN,
                "runtime": {"output_dir": str(tmp_path)},
                "job": {"num": 3},
                "sweeper": {"_target_": sweeper},
            },
        }
    )


OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@pytest.mark.parametrize("value", [None, math.nan, math.inf])
def test_a_trial_without_a_finite_objective_is_a_failed_job(tmp_path, value):
    job_return = JobReturn(overrides=["optim.lr=0.1"], status=JobStatus.COMPLETED)
    job_return.return_value = value
    SweepSummary().on_job_end(_sweep_job_config(tmp_path, OPTUNA), job_return)
    assert job_return.status == JobStatus.FAILED
    with pytest.raises(NoObjectiveError, match="val/accuracy"):
        float(job_return.return_value)  # what the Optuna sweeper does with it
    text = RunDir(tmp_path).error.read_text()
    assert text.startswith("overrides: optim.lr=0.1") and "NoObjectiveError" in text


def test_error_txt_is_rank_0s(tmp_path, monkeypatch):
    """Under SLURM every task runs the job and its callbacks: a rank that stops because rank 0
    failed must not replace rank 0's traceback (nor remove it as it starts late)."""
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    config = _sweep_job_config(tmp_path, BASIC)
    RunDir(tmp_path).error.write_text("rank 0's traceback")
    summary = SweepSummary()
    summary.on_job_start(config)
    job_return = JobReturn(overrides=["seed=1"], status=JobStatus.FAILED)
    job_return.return_value = RuntimeError("Stage 'teacher' failed on rank 0")
    summary.on_job_end(config, job_return)
    assert RunDir(tmp_path).error.read_text() == "rank 0's traceback"


def test_the_basic_sweeper_keeps_jobs_without_objective(tmp_path):
    job_return = JobReturn(overrides=["seed=1"], status=JobStatus.COMPLETED)
    job_return.return_value = None
    SweepSummary().on_job_end(_sweep_job_config(tmp_path, BASIC), job_return)
    assert job_return.status == JobStatus.COMPLETED
    assert not RunDir(tmp_path).error.exists()


def test_optuna_against_the_task_direction_stops_before_any_trial(tmp_path, glue_root, teacher_dir):
    # The plugin's own default is minimize; accuracy is better higher.
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            *sweep_overrides(tmp_path, glue_root, teacher_dir),
            "hydra/sweeper=optuna",
            "optim.lr=tag(log, interval(1e-5, 1e-3))",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "hydra.sweeper.direction=minimize" in output
    assert "set hydra.sweeper.direction=maximize" in output
    assert not sweep.exists() or not job_dirs(sweep)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["search=kd"], None),
        (["search=mlm", "task=corpus/local"], None),
        (["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize"], None),
        # The command line's method wins over the preset's, which searches kd's keys.
        (
            ["method=finetune", "search=kd"],
            "search=kd searches the hyper-parameters of method=kd, but method=finetune runs",
        ),
        (["search=kd", "hydra.sweeper.direction=minimize"], "set hydra.sweeper.direction=maximize"),
    ],
)
def test_study_check_stops_a_study_set_up_against_the_run(overrides, problem, caplog):
    # The check needs Hydra's config loader (the method options): inside the context.
    with initialize_config_dir(config_dir=kdlab.train.CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides, return_hydra_config=True)
        if problem is None:
            StudyCheck().on_multirun_start(cfg)
            return
        with pytest.raises(SystemExit) as stopped:
            StudyCheck().on_multirun_start(cfg)
    assert stopped.value.code == 1
    assert problem in caplog.text


@pytest.mark.parametrize(
    ("overrides", "direction"),
    [(["search=kd"], "maximize"), (["search=mlm", "task=corpus/local"], "minimize")],
)
def test_search_presets_take_the_direction_from_the_task(overrides, direction):
    with initialize_config_dir(config_dir=kdlab.train.CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides, return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == direction
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.method.name == overrides[0].removeprefix("search=")


def test_objective_is_the_last_runs_main_metric():
    teacher = {"main_metric": "accuracy", "student": {"val/accuracy": 0.9}}
    student = {"main_metric": "accuracy", "student": {"val/accuracy": 0.8, "val/loss": 0.5}}
    assert kdlab.train.objective([("teacher", teacher), ("student", student)]) == 0.8
    assert kdlab.train.objective([("kd", {})]) is None  # a rank other than 0
