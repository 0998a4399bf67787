"""Run directories are never silently overwritten: `overwrite=true` replaces a run whole,
pipelines skip, resume or restart their stages, `kdlab.compact` refuses a non-empty output.

The refusals themselves (before anything loads) are cases of tests/test_config_errors.py.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from transformers import AutoConfig

import kdlab.train
from kdlab.compact import main as compact_main
from kdlab.errors import ConfigError
from kdlab.pipeline import run_pipeline
from kdlab.rundir import RunDir, claim_run_dir
from tests.conftest import fast_overrides, run_cli


def test_overwrite_replaces_the_earlier_run_whole(make_cfg, tmp_path):
    run_dir = RunDir(tmp_path / "run")
    first = kdlab.train.run(make_cfg(method="finetune"))
    # What the issue saw left behind: a stale best checkpoint beside the new one and an
    # evaluation output of another kind of run; and Hydra's record of the new job.
    shutil.copy(run_dir.best_checkpoint, run_dir.checkpoints / "best-v1.ckpt")
    (run_dir.path / "predictions.json").write_text("{}")
    run_dir.hydra_dir.mkdir()
    run_dir.hydra_config.write_text("seed: 42\n")
    (run_dir.path / "train.log").write_text("this job's log\n")

    second = kdlab.train.run(
        make_cfg(method="finetune", extra=["model.hidden_size=128", "overwrite=true"])
    )
    assert sorted(p.name for p in run_dir.checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert not (run_dir.path / "predictions.json").exists()
    assert run_dir.hydra_config.read_text() == "seed: 42\n"
    assert (run_dir.path / "train.log").read_text() == "this job's log\n"
    assert OmegaConf.load(run_dir.config).model.hidden_size == 128
    assert AutoConfig.from_pretrained(run_dir.student).hidden_size == 128
    assert json.loads(run_dir.metrics.read_text()) == second
    assert second["student"]["params"] > first["student"]["params"]
    best = torch.load(run_dir.best_checkpoint, weights_only=True)
    assert best["state_dict"]["student.bert.embeddings.word_embeddings.weight"].shape[1] == 128


def test_a_rank_other_than_0_reads_nothing_rank_0_writes_in_the_run_dir(
    make_cfg, tmp_path, monkeypatch
):
    """A SLURM task of rank 1 starts beside rank 0, which may be clearing the directory of an
    earlier run (overwrite=true, a pipeline stage restarted) or writing run_id.txt: rank 1
    must not read it (a file removed between its check and its read raised)."""
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    run_dir.run_id.write_text("earlier-run\n")
    read = []
    original = Path.read_text

    def read_text(path, *args, **kwargs):
        read.append(path)
        return original(path, *args, **kwargs)

    class Assembled(Exception):
        pass

    def assemble(cfg):
        raise Assembled  # the run directory is handled by then

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(kdlab.train, "assemble", assemble)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with pytest.raises(Assembled):
        kdlab.train.run(make_cfg(extra=["overwrite=true"]))
    assert run_dir.run_id not in read


def _write_two_stage_experiment(conf_dir: Path) -> None:
    (conf_dir / "experiment").mkdir(parents=True)
    (conf_dir / "experiment" / "two_stages.yaml").write_text(
        "# @package _global_\n"
        "pipeline:\n"
        "  teacher: [method=finetune]\n"
        '  student: [method=kd, "teacher.path=${stage:teacher}/student"]\n'
    )


def test_pipeline_rerun_restarts_a_stage_that_left_no_checkpoint(tmp_path, glue_root, teacher_dir):
    _write_two_stage_experiment(tmp_path / "conf")
    root = tmp_path / "pipeline"
    command = [
        *fast_overrides(tmp_path, glue_root, teacher_dir, run_dir=root),
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "experiment=two_stages",
        f"hydra.run.dir={root}",
    ]
    teacher, student = RunDir(root / "teacher"), RunDir(root / "student")
    first = run_cli(command)
    assert first.returncode == 0, first.stderr[-3000:]
    assert teacher.finished and student.finished
    teacher_written = teacher.metrics.stat().st_mtime_ns

    # The student stage stopped before its first checkpoint: only its config.yaml is left.
    for entry in student.path.iterdir():
        if entry != student.config:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    again = run_cli(command)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert "Stage 'teacher' already finished" in output
    assert "Stage 'student' left no checkpoint: it starts again from scratch" in output
    assert teacher.metrics.stat().st_mtime_ns == teacher_written
    assert student.finished


@pytest.fixture
def demo_pipeline(tmp_path):
    """``run_pipeline`` on ``experiment=demo`` (stages teacher, student, deploy) in ``tmp/pipeline``,
    with a stand-in for ``kdlab.train.run`` that records how each stage was asked to run."""
    root = tmp_path / "pipeline"

    def start(*overrides: str) -> list[tuple[str, str | None, bool]]:
        calls = []

        def run(stage_cfg):
            calls.append((Path(stage_cfg.run_dir).name, stage_cfg.ckpt_path, stage_cfg.overwrite))
            run_dir = RunDir(stage_cfg.run_dir)
            run_dir.path.mkdir(parents=True, exist_ok=True)
            run_dir.metrics.write_text("{}")
            return {}

        with initialize_config_dir(config_dir=kdlab.train.CONF_DIR, version_base="1.3"):
            cfg = compose(
                "train",
                overrides=["experiment=demo", f"run_dir={root}", *overrides],
                return_hydra_config=True,
            )
            HydraConfig.instance().set_config(cfg)
            run_pipeline(cfg, run)
        return calls

    return root, start


def _unfinished_stage(root: Path, name: str, checkpointed: bool) -> None:
    """Replace stage ``name`` by one that stopped before (or after) its first checkpoint."""
    run_dir = RunDir(root / name)
    shutil.rmtree(run_dir.path, ignore_errors=True)
    run_dir.path.mkdir(parents=True)
    run_dir.config.write_text("seed: 42\n")
    if checkpointed:
        run_dir.checkpoints.mkdir()
        run_dir.last_checkpoint.write_bytes(b"")


def test_pipeline_skips_finished_resumes_checkpointed_restarts_other_stages(demo_pipeline):
    root, start = demo_pipeline
    assert start() == [("teacher", None, False), ("student", None, False), ("deploy", None, False)]

    _unfinished_stage(root, "student", checkpointed=True)
    assert start() == [("student", "last", False)]  # the teacher finished: skipped

    _unfinished_stage(root, "student", checkpointed=False)
    assert start() == [("student", None, True)]  # nothing to resume: restarted afresh

    # overwrite=true on the command line: every stage again, finished or not.
    every = [("teacher", None, True), ("student", None, True), ("deploy", None, True)]
    assert start("overwrite=true") == every


def test_a_deploy_run_that_stopped_is_cleared_for_its_restart(tmp_path):
    """A deploy stage interrupted after writing deploy/ (no metrics.json) restarts with
    overwrite=true (kdlab.pipeline); deploy/ is the run's own, not a foreign file."""
    run_dir = RunDir(tmp_path / "deploy")
    run_dir.deploy.mkdir(parents=True)
    (run_dir.deploy / "model.onnx").write_bytes(b"onnx")
    run_dir.run_id.write_text("abc\n")
    run_dir.config.write_text("seed: 42\n")
    cfg = OmegaConf.create({"ckpt_path": None, "overwrite": True, "run_id": None})
    assert claim_run_dir(cfg, run_dir, rank_zero=True) is None
    assert not run_dir.deploy.exists() and run_dir.config.is_file()


def test_compact_refuses_a_non_empty_output_unless_told_to_overwrite(make_cfg, tmp_path):
    kdlab.train.run(make_cfg(method="finetune"))
    checkpoint = RunDir(tmp_path / "run").last_checkpoint
    out = tmp_path / "fine-tuned"
    out.mkdir()
    (out / "model.safetensors").write_text("a fine-tuned model")
    (out / "tokenizer_extra.json").write_text("{}")

    with pytest.raises(ConfigError, match="--overwrite"):
        compact_main([str(checkpoint), str(out)])
    assert (out / "model.safetensors").read_text() == "a fine-tuned model"

    compact_main([str(checkpoint), str(out), "--overwrite"])
    assert not (out / "tokenizer_extra.json").exists()
    assert AutoConfig.from_pretrained(out).hidden_size == 64

    with pytest.raises(ConfigError, match="holds the checkpoint"):
        compact_main([str(checkpoint), str(checkpoint.parent), "--overwrite"])
    assert checkpoint.is_file()
