"""The teacher-output cache (``method.cache_teacher``): the frozen teacher's outputs on a
fixed training set, computed once and reused by later epochs and later runs. Whether a run
uses it is decided in :mod:`kdlab.methods.traits` (``teacher_cache_for``).

A teacher in eval mode on a fixed set (no augmentation, no mixup, no random masking) gives
the same outputs every epoch, so a 3-seed sweep need run it over its training (or
transfer) set once. The outputs are stored beside the dataset cache (``task.cache_dir``),
under a key that hashes everything they depend on:

- the teacher: its class, its config (without the path it was loaded from) and a sha256
  of its weights;
- how it computes when the cache is built or loaded (:func:`precision_fields`): its
  weights' dtype (Lightning converts them for ``bf16-true`` and ``16-true``), the autocast
  dtype it runs under (``bf16-mixed``, ``16-mixed``) and PyTorch's float32 matmul precision
  (TF32);
- the teacher's tokenizer (``datasets``' hash of it): the student's, which it shares, or
  its own where it tokenises differently (the outputs are then computed on its own ids);
- the data: the ``datasets`` fingerprint of the tokenised training split, which covers its
  content, the subset (``task.train_fraction``, ``task.max_train_samples``) and the transfer
  set;
- ``task.max_seq_length`` and the task's head.

Layout, under ``<task.cache_dir>/<task.name>/teacher-outputs/``::

    <key>/outputs.safetensors   float16: logits [N, C] (classification, regression), or
                                start_logits and end_logits [N, L] (spans, padded to
                                L = max_seq_length)
    <key>/manifest.json         what the key was made of, the rows, each output's shape,
                                the file's size and sha256

Outputs are stored in float16 whatever the teacher computed in (float16 holds a bfloat16
value exactly in its normal range, |x| >= 2^-14, and a float32 one to 2^-11 relative) and
looked up in float32.

A cache whose manifest is unreadable or whose file does not match it (size, sha256,
shapes) is rebuilt with a warning. No file locks (cluster filesystems refuse ``flock`` or
do not share it between nodes): under DDP global rank 0 builds while the other ranks poll
for a valid manifest; a builder writes both files into a folder of its own
(``.<key>.<host>.<pid>.<random>.tmp``) and publishes it by renaming it to ``<key>``, so
readers never see a partial cache and concurrent runs that both build leave one. A builder
deletes only its own temporary folders; a killed one leaves its folder behind.
"""

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch
from datasets.fingerprint import Hasher
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from kdlab.data.base import ROW_INDEX, TokenizedDataModule
from kdlab.errors import ConfigError
from kdlab.models.heads import HEADS, forward, teacher_inputs
from kdlab.publish import publish, wait_for, write_synced

log = logging.getLogger(__name__)

# Bumped whenever what is stored, or how the key is made, changes.
FORMAT_VERSION = 2
OUTPUTS_FILE = "outputs.safetensors"
MANIFEST_FILE = "manifest.json"
FOLDER = "teacher-outputs"
# How long a DDP rank other than 0 waits for rank 0 to publish the cache, and how often it
# looks: long enough for a large transfer set on a slow teacher.
WAIT_SECONDS = 2 * 3600.0
POLL_SECONDS = 2.0
# Heads whose outputs score every token position ([B, L]). They are computed on batches
# padded to max_seq_length and stored that wide: a padded position's score does not depend
# on how much padding follows it (padding is masked as attention keys), so one row serves a
# training batch of any padded width, which takes its first columns.
PER_POSITION_HEADS = frozenset({"question_answering"})


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def config_digest(model: PreTrainedModel) -> str:
    """sha256 of a model's config, without ``_name_or_path`` (the same model moved or
    copied elsewhere is the same teacher)."""
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("_name_or_path", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def precision_fields(teacher: PreTrainedModel) -> dict:
    """How ``teacher`` computes here: its weights' dtype, the autocast dtype on its device
    (None without autocast) and the float32 matmul precision (``high`` allows TF32)."""
    device = next(teacher.parameters()).device.type
    autocast = torch.is_autocast_enabled(device)
    return {
        "teacher_dtype": str(teacher.dtype).removeprefix("torch."),
        "autocast_dtype": (
            str(torch.get_autocast_dtype(device)).removeprefix("torch.") if autocast else None
        ),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def key_fields(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data_fingerprint: str,
    max_seq_length: int,
    head: str,
) -> dict:
    """Everything the cached outputs depend on; :func:`cache_key` hashes it. ``tokenizer``
    is the one whose ids the teacher reads."""
    return {
        "format": FORMAT_VERSION,
        "teacher_class": type(teacher).__name__,
        "teacher_config_sha256": config_digest(teacher),
        "teacher_weights_sha256": weights_digest(teacher),
        **precision_fields(teacher),
        "tokenizer_hash": Hasher.hash(tokenizer),
        "data_fingerprint": data_fingerprint,
        "max_seq_length": int(max_seq_length),
        "head": head,
    }


def cache_key(fields: dict) -> str:
    """The cache's folder name: a hash of :func:`key_fields`."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


class TeacherCache:
    """The teacher's outputs on one training split, stored under a key (see the module
    docstring) and looked up by each training batch's rows (``ROW_INDEX``).

    Args:
        root: the folder of this task's teacher-output caches.
        fields: what the key is made of (:func:`key_fields`).
        rows: the training split's length ``N``.
        head: the task's head (``kdlab.models.heads.HEADS`` key).
        batches: the training split batched for the teacher, in any order, each batch with
            its rows (``ROW_INDEX``) (called once per build).
        about: facts the manifest records for people (teacher path, task), not in the key.
    """

    def __init__(
        self,
        *,
        root: Path,
        fields: dict,
        rows: int,
        head: str,
        batches: Callable[[], Iterable[dict[str, Tensor]]],
        about: dict | None = None,
    ) -> None:
        self.root = Path(root)
        self.fields = fields
        self.rows = rows
        self.head = head
        self.names = list(HEADS[head].outputs.values())
        self.batches = batches
        self.about = about or {}
        self.outputs: dict[str, Tensor] | None = None
        self.status: Literal["built", "reused"] | None = None
        # Teacher forward calls (batches) and examples the last load_or_build ran.
        self.teacher_batches = 0
        self.teacher_examples = 0

    @property
    def key(self) -> str:
        """The hash of :attr:`fields`: the cache's folder name."""
        return cache_key(self.fields)

    @property
    def directory(self) -> Path:
        """The folder of the outputs and their manifest."""
        return self.root / self.key

    # ------------------------------------------------------------------ load or build
    def load_or_build(
        self, teacher: PreTrainedModel, *, builds: bool = True, wait_s: float = WAIT_SECONDS
    ) -> int:
        """Load the stored outputs, or compute them with ``teacher`` (on its device, in the
        dtype and autocast context of the caller) and store them.

        Args:
            teacher: the teacher, as the run will compute with it.
            builds: whether this process builds a missing or damaged cache (single process,
                DDP global rank 0), or waits for another one to publish it (other ranks).
            wait_s: how long a process that does not build waits.

        Returns:
            The examples the teacher ran on: ``N`` when built, ``0`` when reused.

        Raises:
            TimeoutError: (``builds=False``) no valid cache appeared within ``wait_s``.
        """
        # Lightning converts the teacher (``*-true`` precisions) and enters autocast after the
        # cache was made at assembly: key the outputs by how the teacher computes now.
        self.fields = {**self.fields, **precision_fields(teacher)}
        start = time.perf_counter()
        self.teacher_batches = self.teacher_examples = 0
        outputs, problem = self._read()
        self.status = "reused"
        if outputs is None and not builds:
            outputs = self._wait(wait_s)
        elif outputs is None:
            if problem is not None:
                log.warning(
                    "Teacher-output cache %s is unusable (%s): rebuilding it.",
                    self.directory,
                    problem,
                )
            outputs = self._build(teacher)
            self._publish(outputs, time.perf_counter() - start)
            self.status = "built"
        self.outputs = outputs
        log.info(
            "Teacher-output cache %s %s: %d rows, %d teacher forward passes (%d examples), %.1f s.",
            self.status,
            self.directory,
            self.rows,
            self.teacher_batches,
            self.teacher_examples,
            time.perf_counter() - start,
        )
        return self.teacher_examples

    def _wait(self, wait_s: float) -> dict[str, Tensor]:
        """The outputs once another process has published them."""
        return wait_for(
            lambda: self._read()[0],
            self.directory,
            what="teacher-output cache",
            builder="Global rank 0 builds it there: check that it did not fail and that "
            "task.cache_dir is on a filesystem every node sees.",
            wait_s=wait_s,
            poll_s=POLL_SECONDS,
        )

    @torch.no_grad()
    def _build(self, teacher: PreTrainedModel) -> dict[str, Tensor]:
        """One eval pass of the teacher over the split (batches in any order, carrying their
        rows): float16 outputs in row order."""
        device = next(teacher.parameters()).device
        teacher.eval()
        parts: dict[str, list[Tensor]] = {name: [] for name in self.names}
        rows = []
        for batch in self.batches():
            rows.append(batch[ROW_INDEX])
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = forward(teacher, teacher_inputs(batch), self.head)
            for name in self.names:
                stored = outputs[name].to(torch.float16)
                if not torch.isfinite(stored).all():
                    raise ConfigError(
                        f"The teacher's {name} reach {outputs[name].abs().max().item():.3g}, "
                        "beyond float16's range, so they cannot be cached: set "
                        "method.cache_teacher=false."
                    )
                parts[name].append(stored.cpu())
            self.teacher_batches += 1
            self.teacher_examples += batch["input_ids"].size(0)
        # Joined outside autocast: CPU autocast's cat refuses float16 inputs (torch 2.13).
        position = torch.cat(rows).argsort()  # [rows]: where each row's output came
        with torch.autocast("cpu", enabled=False):
            return {name: torch.cat(chunks)[position] for name, chunks in parts.items()}

    def _publish(self, outputs: dict[str, Tensor], seconds: float) -> None:
        """Write the outputs and their manifest and publish them (:func:`kdlab.publish.publish`)."""
        data = safetensors.torch.save(outputs)
        manifest = {
            "key": self.key,
            "key_fields": self.fields,
            "rows": self.rows,
            "outputs": {
                name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                for name, t in outputs.items()
            },
            "file": {
                "name": OUTPUTS_FILE,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            },
            "built": {
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(seconds, 2),
                "teacher_forward_passes": self.teacher_batches,
                **self.about,
            },
        }

        def write(staging: Path) -> None:
            write_synced(staging / OUTPUTS_FILE, data)
            write_synced(staging / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())

        publish(self.directory, write)

    def _read(self) -> tuple[dict[str, Tensor] | None, str | None]:
        """The stored outputs and None, or None and what is wrong with them (None as well
        when nothing was ever stored)."""
        manifest_path = self.directory / MANIFEST_FILE
        if not manifest_path.is_file():
            if self.directory.is_dir() and any(self.directory.iterdir()):
                return None, "no manifest: an interrupted build"
            return None, None
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            expected_file = manifest["file"]
            shapes = {name: spec["shape"] for name, spec in manifest["outputs"].items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            return None, f"unreadable manifest: {err}"
        if manifest.get("key_fields") != self.fields or manifest.get("rows") != self.rows:
            return None, "the manifest describes other teacher outputs"
        path = self.directory / OUTPUTS_FILE
        if not path.is_file():
            return None, f"{OUTPUTS_FILE} is missing"
        data = path.read_bytes()
        if len(data) != expected_file["bytes"]:
            return None, (
                f"{OUTPUTS_FILE} has {len(data)} bytes, the manifest {expected_file['bytes']} "
                "(truncated?)"
            )
        if hashlib.sha256(data).hexdigest() != expected_file["sha256"]:
            return None, f"{OUTPUTS_FILE} does not match the manifest's sha256 (corrupted)"
        try:
            outputs = safetensors.torch.load(data)
        except Exception as err:  # safetensors raises its own error types
            return None, f"{OUTPUTS_FILE} is unreadable: {err}"
        found = {name: list(t.shape) for name, t in outputs.items()}
        dtypes = {str(t.dtype) for t in outputs.values()}
        rows = {shape[0] for shape in found.values()}
        if found != shapes or sorted(found) != sorted(self.names) or rows != {self.rows}:
            return None, f"outputs {found}, expected {self.names} of {self.rows} rows"
        if dtypes != {"torch.float16"}:
            return None, f"outputs of dtype {sorted(dtypes)}, expected float16"
        return outputs, None

    # ------------------------------------------------------------------------ lookup
    def covers(self, batch: dict[str, Tensor]) -> bool:
        """Whether the outputs are loaded and ``batch`` says which rows it holds."""
        return self.outputs is not None and ROW_INDEX in batch

    def lookup(self, batch: dict[str, Tensor]) -> ModelOutput:
        """The teacher's outputs on ``batch``'s rows, on the batch's device, in float32 (the
        stored float16 values, exactly: whatever the run computes in, a bfloat16 rounding
        would lose 3 of their 11 bits); per-position outputs cut to the batch's padded width
        ``[B, W]``."""
        rows = batch[ROW_INDEX]
        if next(iter(self.outputs.values())).device != rows.device:
            self.outputs = {name: t.to(rows.device) for name, t in self.outputs.items()}
        width = batch["input_ids"].size(1)
        found = {}
        for name, table in self.outputs.items():
            values = table[rows]
            if self.head in PER_POSITION_HEADS:
                values = values[:, :width]
            found[name] = values.float()
        return ModelOutput(**found)

    def summary(self) -> dict:
        """What ``metrics.json`` records about the cache."""
        return {
            "status": self.status,
            "path": str(self.directory),
            "rows": self.rows,
            "teacher_forward_passes": self.teacher_batches,
        }


def teacher_cache(teacher: PreTrainedModel, datamodule: TokenizedDataModule) -> TeacherCache:
    """The teacher-output cache of ``datamodule``'s training split (after ``setup``), which
    from now on gives its training batches their rows (``ROW_INDEX``).

    The cache is built or loaded later, by :meth:`TeacherCache.load_or_build`, once the
    teacher is on its device.
    """
    split = datamodule.train_split()
    max_len = int(datamodule.task.max_seq_length)
    head = datamodule.head
    collate = datamodule.collator
    # The teacher's ids are what it computed its outputs on.
    tokenizer = datamodule.teacher_tokenizer
    if tokenizer is None:
        tokenizer = datamodule.tokenizer
    if head in PER_POSITION_HEADS:
        collate = dataclasses.replace(collate, padding="max_length", max_length=max_len)
    datamodule.index_training_rows()
    return TeacherCache(
        root=datamodule.cache_dir / datamodule.task.name / FOLDER,
        fields=key_fields(teacher, tokenizer, split._fingerprint, max_len, head),
        rows=len(split),
        head=head,
        batches=lambda: datamodule.eval_loader(
            split.add_column(ROW_INDEX, list(range(len(split)))), collate_fn=collate
        ),
        about={"task": datamodule.task.name, "teacher": teacher.name_or_path},
    )
