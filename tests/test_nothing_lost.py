"""Nothing lost: a refused command leaves the run directory exactly as it was, ``overwrite``
removes only what a run wrote, and interrupted or failed writes (Ctrl-C, a full disk) leave
the previous complete file or folder in place."""

import errno
import io
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

import kdlab.train
from kdlab.compact import main as compact_main
from kdlab.errors import ConfigError
from kdlab.rundir import RunDir
from kdlab.sweep import SweepSummary
from tests.conftest import fast_overrides, run_cli
from tests.fixtures import write_tiny_bert
from tests.test_config_errors import no_model_loads  # noqa: F401  (a fixture)


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under ``folder``: its bytes (None for a folder) and its mtime."""
    return {
        str(path.relative_to(folder)): (
            None if path.is_dir() else path.read_bytes(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(folder.rglob("*"))
    }


def users_folder(tmp: Path) -> tuple[list[str], list[str], list[str]]:
    """A folder of the user's own: a config.yaml that is not a run's, notes, data."""
    folder = tmp / "run"
    (folder / "mydata").mkdir(parents=True)
    (folder / "mydata" / "train.tsv").write_text("sentence\tlabel\n")
    (folder / "config.yaml").write_text("lr: 0.1\nbatch: 8\n")
    (folder / "notes.txt").write_text("my notes\n")
    names = "config.yaml, mydata/, notes.txt"
    return [], [f"run_dir {folder} holds files that are not a kdlab run's ({names};"], ["overwrite"]


def users_folder_with_overwrite(tmp: Path):
    overrides, fragments, absent = users_folder(tmp)
    return ["overwrite=true"], fragments, absent


def run_with_notes_and_overwrite(tmp: Path):
    run_dir = RunDir(tmp / "run")
    run_dir.checkpoints.mkdir(parents=True)
    run_dir.run_id.write_text("0123456789ab\n")
    run_dir.config.write_text("seed: 1\n")
    run_dir.last_checkpoint.write_bytes(b"a checkpoint")
    (run_dir.path / "notes.txt").write_text("my notes\n")
    return (
        ["overwrite=true"],
        [
            "overwrite=true removes only what a kdlab run wrote",
            f"{run_dir.path} also holds notes.txt",
        ],
        [],
    )


# A case: setup(tmp) -> (overrides, fragments the message holds, fragments it must not hold).
REFUSED = {
    "a user's folder": users_folder,
    "a user's folder, overwrite=true": users_folder_with_overwrite,
    "a run with the user's notes, overwrite=true": run_with_notes_and_overwrite,
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_before_anything_loads_and_nothing_is_touched(
    name,
    make_cfg,
    tmp_path,
    no_model_loads,  # noqa: F811
):
    overrides, fragments, absent = REFUSED[name](tmp_path)
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError) as raised:
        kdlab.train.run(make_cfg(extra=overrides))
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    for fragment in absent:
        assert fragment not in message, f"{fragment!r} in: {message}"
    assert snapshot(tmp_path / "run") == before


def _truncated(path: Path) -> Path:
    """A checkpoint cut short, as a full disk or a killed write leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def truncated_last_checkpoint(tmp: Path, make_cfg, monkeypatch):
    run_dir = RunDir(tmp / "run")
    _truncated(run_dir.last_checkpoint)
    run_dir.run_id.write_text("0123456789ab\n")
    run_dir.config.write_text("seed: 1\n")
    return lambda: kdlab.train.run(make_cfg(extra=["ckpt_path=last"])), [
        f"ckpt_path=last: checkpoint {run_dir.last_checkpoint} cannot be read",
        "truncated",
        f"ckpt_path={run_dir.best_checkpoint}",
        "leave ckpt_path unset",
    ]


def compact_missing_checkpoint(tmp: Path, make_cfg, monkeypatch):
    missing = tmp / "run" / "checkpoints" / "best.ckpt"
    return lambda: compact_main([str(missing), str(tmp / "out")]), [
        f"checkpoint {missing} does not exist",
        "checkpoints/best.ckpt or last.ckpt",
    ]


def compact_yaml_file(tmp: Path, make_cfg, monkeypatch):
    config = tmp / "config.yaml"
    config.write_text("seed: 1\nmodel:\n  name: bert3\n")
    return lambda: compact_main([str(config), str(tmp / "out")]), [
        f"checkpoint {config} cannot be read",
        "not a torch checkpoint",
    ]


def compact_truncated_checkpoint(tmp: Path, make_cfg, monkeypatch):
    checkpoint = _truncated(tmp / "best.ckpt")
    return lambda: compact_main([str(checkpoint), str(tmp / "out")]), [
        f"checkpoint {checkpoint} cannot be read",
        "truncated",
    ]


def _failing(monkeypatch, method: str, name: str, error: OSError) -> None:
    """``Path.<method>`` raises ``error`` for paths named ``name``."""
    original = getattr(Path, method)

    def fail(path, *args, **kwargs):
        if path.name == name:
            raise error
        return original(path, *args, **kwargs)

    monkeypatch.setattr(Path, method, fail)


def read_only_parent(tmp: Path, make_cfg, monkeypatch):
    # (Root ignores file permissions: the refusal is simulated.)
    _failing(monkeypatch, "mkdir", "run", PermissionError(errno.EACCES, "Permission denied"))
    return lambda: kdlab.train.run(make_cfg()), [
        f"run_dir {tmp / 'run'} cannot be written (Permission denied)",
        "make it writable",
        "hydra.run.dir",
    ]


def full_disk_at_the_start(tmp: Path, make_cfg, monkeypatch):
    (tmp / "run").mkdir()  # as Hydra creates it
    _failing(monkeypatch, "write_text", "run_id.txt", OSError(errno.ENOSPC, "No space left"))
    return lambda: kdlab.train.run(make_cfg()), [
        f"run_dir {tmp / 'run'} cannot be written (No space left)",
        "free space there",
    ]


def run_dir_is_a_file(tmp: Path, make_cfg, monkeypatch):
    (tmp / "run").write_text("a file\n")
    return lambda: kdlab.train.run(make_cfg()), [
        f"run_dir {tmp / 'run'} is a file, not a directory",
        "hydra.run.dir",
    ]


# A case: setup(tmp, make_cfg, monkeypatch) -> (the command, fragments its ConfigError's
# message holds).
CLEAR_ERRORS: dict[str, Callable] = {
    "ckpt_path=last with a truncated last.ckpt": truncated_last_checkpoint,
    "compact of a missing checkpoint": compact_missing_checkpoint,
    "compact of a YAML file": compact_yaml_file,
    "compact of a truncated checkpoint": compact_truncated_checkpoint,
    "read-only run directory": read_only_parent,
    "full disk as the run starts": full_disk_at_the_start,
    "run_dir is a file": run_dir_is_a_file,
}


@pytest.mark.parametrize("name", list(CLEAR_ERRORS))
def test_file_problems_are_clear_errors_before_any_work(
    name,
    make_cfg,
    tmp_path,
    monkeypatch,
    no_model_loads,  # noqa: F811
):
    command, fragments = CLEAR_ERRORS[name](tmp_path, make_cfg, monkeypatch)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as raised:
        command()
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert snapshot(tmp_path) == before


def _student_checkpoint(tmp: Path) -> Path:
    """A checkpoint as a kdlab run writes it (``BaseMethod.on_save_checkpoint``), of the tiny
    BERT, its tokenizer named by the run's config.yaml beside ``checkpoints/``."""
    model_dir = write_tiny_bert(tmp / "tiny")
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir)
    run_dir = RunDir(tmp / "run")
    run_dir.checkpoints.mkdir(parents=True)
    run_dir.config.write_text(f"model:\n  tokenizer: {model_dir}\n")
    torch.save(
        {
            "state_dict": {f"student.{k}": v for k, v in model.state_dict().items()},
            "kdlab_student": {
                "architecture": type(model).__name__,
                "config": model.config.to_dict(),
            },
        },
        run_dir.best_checkpoint,
    )
    return run_dir.best_checkpoint


@pytest.mark.parametrize("failure", ["ctrl-c after the weights", "full disk in the weights"])
def test_an_interrupted_compact_overwrite_keeps_the_old_model(failure, tmp_path, monkeypatch):
    checkpoint = _student_checkpoint(tmp_path)
    out = tmp_path / "out"
    compact_main([str(checkpoint), str(out)])
    (out / "note.txt").write_text("the old model")
    before = snapshot(out)
    if failure.startswith("ctrl-c"):

        def interrupted(self, *args, **kwargs):
            raise KeyboardInterrupt

        # The model (config.json, weights) is written by then: the old export was deleted
        # first, and this left a folder with the new model's files only.
        monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", interrupted)
        expected = KeyboardInterrupt
    else:
        original = transformers.PreTrainedModel.save_pretrained

        def full_disk(self, directory, *args, **kwargs):
            original(self, directory, *args, **kwargs)
            weights = Path(directory) / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
            raise OSError(errno.ENOSPC, "No space left on device", str(weights))

        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
        expected = OSError
    with pytest.raises(expected) as raised:
        compact_main([str(checkpoint), str(out), "--overwrite"])
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run", "tiny"]
    if expected is OSError:
        assert raised.value.errno == errno.ENOSPC
        assert f"No space left on the device of {tmp_path} while writing out" in str(raised.value)
        assert "is kept as it was" in str(raised.value)


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoints(
    make_cfg, tmp_path, monkeypatch
):
    """The first checkpoint of epoch 2 hits a full disk halfway: epoch 1's best.ckpt and
    last.ckpt stay whole, nothing partial is left, and the error names the folder."""
    run_dir = RunDir(tmp_path / "run")
    original = torch.save
    saves, kept = [], {}

    def save(obj, f, *args, **kwargs):
        if not (isinstance(obj, dict) and "state_dict" in obj):  # not a training checkpoint
            return original(obj, f, *args, **kwargs)
        saves.append(f)
        if len(saves) < 3:  # epoch 1: best.ckpt, last.ckpt
            return original(obj, f, *args, **kwargs)
        kept.update(snapshot(run_dir.checkpoints))
        whole = io.BytesIO()
        original(obj, whole)
        half = whole.getvalue()[: len(whole.getvalue()) // 2]
        if isinstance(f, str | Path):
            Path(f).write_bytes(half)
        else:
            f.write(half)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError) as raised:
        kdlab.train.run(make_cfg(method="finetune", extra=["trainer.max_epochs=2"]))
    assert raised.value.errno == errno.ENOSPC
    message = str(raised.value)
    assert f"No space left on the device of {run_dir.checkpoints}" in message
    assert "is kept as it was" in message
    assert sorted(kept) == ["best.ckpt", "last.ckpt"]
    assert snapshot(run_dir.checkpoints) == kept
    for checkpoint in (run_dir.best_checkpoint, run_dir.last_checkpoint):
        assert torch.load(checkpoint, weights_only=False)["epoch"] == 0
    assert not run_dir.finished


def test_error_txt_holds_the_error_or_the_log_does_on_a_full_disk(tmp_path, monkeypatch, caplog):
    """A job that failed on a full disk: its error.txt (kdlab.sweep.SweepSummary) cannot be
    written either. No empty or cut error.txt is left; the log holds what it would."""
    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}})
    error = OSError(errno.ENOSPC, "No space left on the device of /runs/x/checkpoints")
    original = Path.write_text

    def full_disk(path, text, *args, **kwargs):
        original(path, text[:10], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_text", full_disk)
    job_return = JobReturn(overrides=["seed=1"], status=JobStatus.FAILED)
    job_return.return_value = error
    with caplog.at_level(logging.ERROR, logger="kdlab"):
        SweepSummary().on_job_end(config, job_return)
    assert list(tmp_path.iterdir()) == []
    logged = caplog.text
    assert f"{RunDir(tmp_path).error} could not be written" in logged
    assert "overrides: seed=1" in logged and "No space left on the device of /runs/x" in logged

    monkeypatch.setattr(Path, "write_text", original)  # space again: the file holds it
    SweepSummary().on_job_end(config, job_return)
    text = RunDir(tmp_path).error.read_text()
    assert text.startswith("overrides: seed=1") and "No space left on the device of" in text


def test_refused_commands_leave_a_finished_run_as_it_was(tmp_path, glue_root, teacher_dir):
    """Hydra's record (.hydra/), the job log and error.txt included: they are written only
    once a run has claimed its directory."""
    root = tmp_path / "run"
    base = [
        *fast_overrides(tmp_path, glue_root, teacher_dir, method="finetune", run_dir=root),
        f"hydra.run.dir={root}",
    ]
    first = run_cli(base)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = RunDir(root)
    assert run_dir.finished and run_dir.job_logs == [root / "train.log"]
    assert OmegaConf.load(run_dir.hydra_overrides) == base[:-1]  # Hydra keeps hydra.* apart
    assert set(OmegaConf.load(run_dir.hydra_config)) == set(OmegaConf.load(run_dir.config))
    assert "Run finished in" in (root / "train.log").read_text() and "Run finished in" in (
        first.stdout + first.stderr
    )
    before = snapshot(root)
    refused = {
        "trainer.max_steps=2": "already holds a run",
        "ckpt_path=last": "is finished",
        "overwrite=true ckpt_path=last": "overwrite=true would delete the checkpoint",
    }
    for overrides, message in refused.items():
        again = run_cli([*base, *overrides.split()])
        assert again.returncode == 1
        assert message in again.stdout + again.stderr
        assert snapshot(root) == before, overrides


def test_a_hydra_run_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "run").write_text("a file\n")
    proc = run_cli([f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert f"hydra.run.dir={tmp_path / 'run'} is a file, not a directory" in output
    assert "Traceback" not in output
    assert (tmp_path / "run").read_text() == "a file\n"


def test_a_full_disk_while_exporting_leaves_no_student_that_looks_whole(
    make_cfg, tmp_path, monkeypatch
):
    """The tokenizer's files hit a full disk after the model's were written: no student/
    (stock transformers would load the model half), no partial folder, no metrics.json."""

    def full_disk(self, directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", full_disk)
    with pytest.raises(OSError) as raised:
        kdlab.train.run(make_cfg(method="finetune"))
    run_dir = RunDir(tmp_path / "run")
    assert f"No space left on the device of {run_dir.path} while writing student" in str(
        raised.value
    )
    assert not run_dir.student.exists() and not run_dir.finished
    assert not [p.name for p in run_dir.path.iterdir() if p.name.startswith(".")]
    assert run_dir.best_checkpoint.is_file()  # what a resume or kdlab.compact reads
