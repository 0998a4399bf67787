"""Nothing lost: a refused command leaves the run directory exactly as it was, ``overwrite``
removes only what a run wrote, and interrupted or failed writes (Ctrl-C, a full disk) leave
the previous complete file or folder in place."""

from pathlib import Path

import pytest

import kdlab.train
from kdlab.errors import ConfigError
from kdlab.rundir import RunDir
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
