"""Folders built once and shared by processes and nodes, without file locks (cluster
filesystems refuse ``flock`` or do not share it between nodes).

One process builds the folder's files into a staging folder of its own beside the target
(``.<name>.<host>.<pid>.<random>.tmp``) and publishes it by renaming it to the target, so a
reader never sees a partial folder and concurrent builders (two nodes, two runs) leave one.
The others poll for a valid folder with a time limit. A builder deletes only its own
staging folders; a killed one leaves its folder behind.

Used by the teacher-output cache (:mod:`kdlab.methods.teacher_cache`) and the corpus chunks
(:mod:`kdlab.data.corpus`).
"""

import contextlib
import errno
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk before it is published."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rename_folder(source: Path, target: Path) -> bool:
    """Rename the folder ``source`` to ``target`` (atomic); False where ``target`` is a
    folder already, which a rename does not replace unless it is empty."""
    try:
        os.rename(source, target)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


def publish(
    directory: Path, write: Callable[[Path], None], stands: Callable[[], bool] | None = None
) -> None:
    """Build ``directory``'s files with ``write(staging)`` in a staging folder of this
    process's own, then rename that folder to ``directory``.

    A folder already at ``directory`` (a damaged one, or one that another builder has just
    published) is moved aside and replaced, unless ``stands()`` says it is valid: then it is
    kept and this builder's own discarded. Where yet another builder publishes meanwhile,
    its folder stands. Files that ``write`` syncs (:func:`write_synced`) are on disk when
    they are published.

    Args:
        directory: the folder to publish; its parent is created.
        write: writes the files into the staging folder it is given.
        stands: whether the folder found at ``directory`` is valid and stays (other
            processes may be reading it); without it, a folder found is replaced.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Host and pid make the name unique across nodes and say whose it is; mkdtemp's
    # random part, across processes that share both.
    prefix = f".{directory.name}.{socket.gethostname()}.{os.getpid()}."
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=prefix, suffix=".tmp"))
    aside = staging.with_suffix(".old")
    try:
        write(staging)
        if not _rename_folder(staging, directory) and not (stands is not None and stands()):
            with contextlib.suppress(FileNotFoundError):  # another builder moved it
                os.rename(directory, aside)
            # False: yet another builder published meanwhile; its folder stands.
            _rename_folder(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)


def wait_for(
    read: Callable[[], T | None],
    directory: Path,
    *,
    what: str,
    builder: str,
    wait_s: float,
    poll_s: float,
) -> T:
    """What ``read`` finds once another process has published ``directory`` (polling the
    filesystem: no collective, no lock).

    Args:
        read: the published content, or None while there is no valid folder.
        directory: the folder, for the messages.
        what: what the folder holds, for the messages ("teacher-output cache").
        builder: who builds it and what to check, for the error ("Global rank 0 builds it
            there: check ...").
        wait_s: how long to wait.
        poll_s: how often to look.

    Raises:
        TimeoutError: no valid folder within ``wait_s``, naming the folder.
    """
    log.info("Waiting for the %s %s", what, directory)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(min(poll_s, wait_s))
        found = read()
        if found is not None:
            return found
    raise TimeoutError(f"No valid {what} appeared in {directory} within {wait_s:g} s. {builder}")
