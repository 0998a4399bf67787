"""The teacher-output cache (``method.cache_teacher``): cached outputs equal the live
teacher's, runs with it match runs without it, its key follows what the outputs depend on,
damaged caches are rebuilt, concurrent builders leave one valid cache, and the methods and
tasks it is not valid for refuse it."""

import copy
import errno
import fcntl
import json
import logging
import multiprocessing
import re
import threading
import time

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForSequenceClassification

import kdlab.methods.teacher_cache
import kdlab.train
from kdlab.components import validate
from kdlab.data.base import ROW_INDEX
from kdlab.errors import ConfigError
from kdlab.methods import KnowledgeDistillation
from kdlab.methods.teacher_cache import (
    MANIFEST_FILE,
    OUTPUTS_FILE,
    TeacherCache,
    cache_key,
    teacher_cache,
)
from kdlab.methods.traits import teacher_cache_refusal
from kdlab.models.build import load_tokenizer
from kdlab.models.heads import forward
from kdlab.optim import Optim
from kdlab.rundir import RunDir
from tests.conftest import (
    build_datamodule,
    build_student,
    build_teacher,
    fast_overrides,
    run_cli,
)
from tests.fixtures import (
    write_corpus,
    write_squad,
    write_tiny_bert,
    write_tiny_mlm_bert,
    write_tiny_qa_bert,
)

# float16 keeps 11 significant bits: a stored logit is within 2^-11 (relative) of the
# teacher's (round to nearest, normal range); atol leaves room for the float32 noise of a
# differently padded batch on logits of order 10.
FP16 = {"rtol": 2**-11, "atol": 1e-5}
# The fixture teachers' random heads give logits of at most 0.012, where any rounding hides
# under atol: these teachers' heads are scaled to logits of order 1-10, as a fine-tuned
# teacher's.
HEAD_SCALE = 600.0
# A student trained on float16-rounded teacher logits drifts from one trained on the float32
# ones: by at most 7.5e-9 (kd) and 1.2e-7 (pd) in any weight on these fixtures (3 epochs,
# 18 steps at lr 5e-5); the validation accuracy is the same.
WEIGHTS_ATOL = 1e-6


def realistic_teacher(directory, num_labels: int = 2):
    """The fixture teacher with its classifier scaled by ``HEAD_SCALE``."""
    write_tiny_bert(directory, num_labels=num_labels)
    model = AutoModelForSequenceClassification.from_pretrained(directory)
    with torch.no_grad():
        model.classifier.weight.mul_(HEAD_SCALE)
    model.save_pretrained(directory)
    return directory


def prepared(cfg: DictConfig, tokenizer=None):
    """The datamodule (set up) and teacher a run of ``cfg`` builds."""
    datamodule = build_datamodule(cfg, tokenizer)
    datamodule.setup("fit")
    return datamodule, build_teacher(cfg)


def loaded_cache(cfg: DictConfig):
    """The datamodule, teacher and a loaded (built or reused) cache of ``cfg``."""
    datamodule, teacher = prepared(cfg)
    cache = teacher_cache(teacher, datamodule)
    cache.load_or_build(teacher)
    return datamodule, teacher, cache


# ---------------------------------------------------------------- cached = live teacher
@pytest.mark.parametrize("task", ["sst2", "stsb"])
def test_cached_outputs_equal_the_live_teachers_to_fp16_precision(make_cfg, tmp_path, task):
    teacher_path = realistic_teacher(tmp_path / "teacher", num_labels=1 if task == "stsb" else 2)
    cfg = make_cfg(task=task, extra=[f"teacher.path={teacher_path}"])
    datamodule, teacher, cache = loaded_cache(cfg)
    assert cache.status == "built" and cache.teacher_examples == cache.rows == 48
    seen, largest, error = [], 0.0, 0.0
    for batch in datamodule.train_dataloader():
        cached = cache.lookup(batch)["logits"]
        live = forward(teacher, batch, datamodule.head).logits
        assert cached.dtype == torch.float32 and cached.shape == live.shape
        torch.testing.assert_close(cached, live, **FP16)
        largest = max(largest, live.abs().max().item())
        error = max(error, (cached - live).abs().max().item())
        seen += batch[ROW_INDEX].tolist()
    # Logits of order 1-10, rounded to float16 where stored (so the bound above is tight).
    assert 1.0 < largest < 16.0 and error > 0.0
    # The sampler shuffles; every row is looked up once an epoch all the same.
    assert sorted(seen) == list(range(48)) and seen != sorted(seen)


class LiveTeacherBeside(L.Callback):
    """Beside each training step: the teacher's outputs as the step reads them (the cache)
    and as the live teacher computes them, in the step's precision context."""

    def __init__(self) -> None:
        self.pairs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with trainer.precision_plugin.train_step_context(), torch.no_grad():
            cached = pl_module.teacher_outputs(batch).logits
            live = pl_module.forward_model(pl_module.teacher, batch).logits
        self.pairs.append((cached, live))


# trainer.precision: the teacher's weights' dtype and autocast dtype in the cache key.
PRECISIONS = {
    "32-true": ("float32", None),
    "bf16-mixed": ("float32", "bfloat16"),
    "bf16-true": ("bfloat16", None),
}


def test_training_reads_the_outputs_of_the_teacher_as_it_runs_at_each_precision(make_cfg, tmp_path):
    teacher_path = realistic_teacher(tmp_path / "teacher")
    directories = set()
    for precision, (dtype, autocast) in PRECISIONS.items():
        cfg = make_cfg(
            run_dir=tmp_path / precision,
            extra=[f"teacher.path={teacher_path}", f"trainer.precision={precision}"],
        )
        validate(cfg)
        L.seed_everything(cfg.seed)
        parts = kdlab.train.assemble(cfg)
        probe = LiveTeacherBeside()
        parts.trainer.callbacks.append(probe)
        parts.trainer.fit(parts.method, datamodule=parts.datamodule)
        cache = parts.method.teacher_cache
        # Each precision builds its own cache: none reuses another's outputs.
        assert cache.status == "built" and cache.directory not in directories
        directories.add(cache.directory)
        expected = {"teacher_dtype": dtype, "autocast_dtype": autocast}
        assert {k: cache.fields[k] for k in expected} == expected
        manifest = json.loads((cache.directory / MANIFEST_FILE).read_text())
        assert manifest["key_fields"] == cache.fields
        assert len(probe.pairs) == 6
        for cached, live in probe.pairs:
            # float32 under every precision: the stored float16 values, never rounded
            # through bfloat16. Built as training computes the teacher (in its autocast or
            # dtype), they are its outputs to float16's rounding (none for bfloat16 ones).
            assert cached.dtype == torch.float32
            torch.testing.assert_close(cached, live.float(), **FP16)


def test_squad_start_and_end_logits_round_trip(make_cfg, tmp_path):
    cfg = make_cfg(
        task="squad",
        method="kd",
        extra=[
            f"task.train_file={write_squad(tmp_path / 'train.json', n_articles=3)}",
            f"task.validation_file={write_squad(tmp_path / 'dev.json', n_articles=1, seed=1)}",
            "task.max_seq_length=64",
            "task.doc_stride=16",
            "task.batch_size=4",
            f"teacher.path={write_tiny_qa_bert(tmp_path / 'qa')}",
        ],
    )
    datamodule, teacher, cache = loaded_cache(cfg)
    other_seed = build_datamodule(cfg, seed=5)
    other_seed.setup("fit")
    assert teacher_cache(teacher, other_seed).key == cache.key
    stored = safetensors_shapes(cache)
    assert stored == {"start_logits": [cache.rows, 64], "end_logits": [cache.rows, 64]}
    widths = set()
    for batch in datamodule.train_dataloader():
        cached = cache.lookup(batch)
        live = forward(teacher, batch, datamodule.head)
        width = batch["input_ids"].size(1)
        widths.add(width)
        for name in ("start_logits", "end_logits"):
            assert cached[name].shape == (batch["input_ids"].size(0), width)
            torch.testing.assert_close(cached[name], live[name], **FP16)
    assert min(widths) < 64  # some batches are narrower than the stored rows


def safetensors_shapes(cache: TeacherCache) -> dict:
    manifest = json.loads((cache.directory / MANIFEST_FILE).read_text())
    return {name: spec["shape"] for name, spec in manifest["outputs"].items()}


def test_kd_module_reads_the_cache_in_float32(make_cfg):
    cfg = make_cfg()
    datamodule, teacher, cache = loaded_cache(cfg)
    module = KnowledgeDistillation(
        name="kd",
        student=build_student(cfg),
        teacher=teacher,
        head=datamodule.head,
        split_metrics={},
        optim=Optim(),
    )
    module.teacher_cache = cache
    batch = next(iter(datamodule.train_dataloader()))
    live = forward(teacher, batch, datamodule.head).logits

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher ran on a batch the cache holds")

    teacher.forward = refuse
    cached = module.teacher_outputs(batch).logits
    assert cached.dtype == live.dtype == torch.float32
    torch.testing.assert_close(cached, live, **FP16)
    # Under autocast too: the stored values, not a bfloat16 rounding of them.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.teacher_outputs(batch).logits
    assert mixed.dtype == torch.float32 and torch.equal(mixed, cached)


# --------------------------------------------------------------- runs with and without
def trained(make_cfg, tmp_path, name: str, method: str, *extra: str):
    """``metrics.json`` and the exported student's weights of a 3-epoch run."""
    cfg = make_cfg(method=method, run_dir=tmp_path / name, extra=["trainer.max_epochs=3", *extra])
    metrics = kdlab.train.run(cfg)
    student = AutoModelForSequenceClassification.from_pretrained(RunDir(cfg.run_dir).student)
    return metrics, student.state_dict()


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("method", ["kd", "pd"])
def test_a_run_with_the_cache_matches_one_without_and_a_second_run_reuses_it(
    make_cfg, tmp_path, method
):
    live, live_weights = trained(make_cfg, tmp_path, "live", method, "method.cache_teacher=false")
    built, built_weights = trained(make_cfg, tmp_path, "built", method)
    reused, reused_weights = trained(make_cfg, tmp_path, "reused", method)
    # Teacher compute in passes over the 48 training examples: one per epoch without the
    # cache, one to build it, none to reuse it.
    assert (live["teacher_passes"], live["teacher_cache"]) == (3.0, None)
    assert built["teacher_passes"] == 1.0 and built["teacher_cache"]["status"] == "built"
    assert reused["teacher_passes"] == 0.0 and reused["teacher_cache"]["status"] == "reused"
    assert reused["teacher_cache"]["path"] == built["teacher_cache"]["path"]
    assert largest_difference(built_weights, live_weights) <= WEIGHTS_ATOL
    assert built["student"]["val/accuracy"] == live["student"]["val/accuracy"]
    # The same stored outputs, the same order, the same seed: the same student.
    assert largest_difference(reused_weights, built_weights) == 0.0
    logged = (tmp_path / "built" / "csv").rglob("metrics.csv")
    rows = [line for path in logged for line in path.read_text().splitlines()]
    assert "train/teacher_passes" in rows[0]


# ------------------------------------------------------------------------- the key
def test_the_key_follows_teacher_weights_precision_data_tokenizer_and_max_seq_length(
    make_cfg, tmp_path, glue_root
):
    cfg = make_cfg()
    datamodule, teacher = prepared(cfg)
    base = teacher_cache(teacher, datamodule)
    assert base.load_or_build(teacher) == 48 and base.status == "built"

    def changed(cache: TeacherCache) -> set[str]:
        assert cache.key != base.key and cache.key == cache_key(cache.fields)
        return {k for k in base.fields if cache.fields[k] != base.fields[k]}

    datamodule_again, teacher_again = prepared(cfg)  # another load of the same files
    again = teacher_cache(teacher_again, datamodule_again)
    assert again.key == base.key
    assert again.load_or_build(teacher_again) == 0 and again.status == "reused"
    # Another training seed and batch size read the same outputs: a seed sweep shares them.
    other_seed = build_datamodule(make_cfg(extra=["seed=7", "task.batch_size=4"]), seed=7)
    other_seed.setup("fit")
    assert teacher_cache(teacher, other_seed).key == base.key

    # The precision the teacher runs in when the cache is built, after the key was first
    # made at assembly (in float32): a bf16-true run converts the teacher, a bf16-mixed
    # run computes it under autocast, TF32 rounds float32 products.
    half = teacher_cache(teacher, datamodule)
    half_teacher = copy.deepcopy(teacher).to(torch.bfloat16)
    assert half.load_or_build(half_teacher) == 48 and half.status == "built"
    assert changed(half) == {"teacher_dtype"}
    mixed = teacher_cache(teacher, datamodule)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mixed.load_or_build(teacher) == 48 and mixed.status == "built"
    assert changed(mixed) == {"autocast_dtype"}
    assert mixed.key != half.key
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert changed(teacher_cache(teacher, datamodule)) == {"float32_matmul_precision"}
    finally:
        torch.set_float32_matmul_precision(previous)

    subset = prepared(make_cfg(extra=["task.max_train_samples=20"]))[0]
    assert changed(teacher_cache(teacher, subset)) == {"data_fingerprint"}
    edited = tmp_path / "SST-2"
    edited.mkdir()
    (edited / "dev.tsv").write_text((glue_root / "SST-2" / "dev.tsv").read_text())
    lines = (glue_root / "SST-2" / "train.tsv").read_text().splitlines()
    lines[1] = "the rain was fun\t1"
    (edited / "train.tsv").write_text("\n".join(lines) + "\n")
    other_data = prepared(make_cfg(extra=[f"task.data_dir={edited}"]))[0]
    assert changed(teacher_cache(teacher, other_data)) == {"data_fingerprint"}

    # A transfer set's contents: the same file name, one line edited.
    transfer = tmp_path / "transfer.tsv"

    def transfer_key(text: str) -> str:
        transfer.write_text(text)
        pd = make_cfg(method="pd", extra=[f"task.transfer.files=[{transfer}]"])
        return teacher_cache(teacher, prepared(pd)[0]).key

    first = transfer_key("the film was good\nit is fun\n")
    assert transfer_key("the film was bad\nit is fun\n") not in (first, base.key)
    assert transfer_key("the film was good\nit is fun\n") == first

    tokenizer = load_tokenizer(cfg.model.tokenizer, "model.tokenizer")
    tokenizer.add_tokens(["zebra"])
    other_tokenizer = prepared(cfg, tokenizer)[0]
    assert "tokenizer_hash" in changed(teacher_cache(teacher, other_tokenizer))
    shorter = prepared(make_cfg(extra=["task.max_seq_length=16"]))[0]
    assert "max_seq_length" in changed(teacher_cache(teacher, shorter))

    with torch.no_grad():
        teacher.classifier.bias[0] += 0.5
    new_weights = teacher_cache(teacher, datamodule)
    assert changed(new_weights) == {"teacher_weights_sha256"}
    assert new_weights.load_or_build(teacher) == 48 and new_weights.status == "built"
    shift = new_weights.outputs["logits"][:, 0] - base.outputs["logits"][:, 0]
    torch.testing.assert_close(shift.float(), torch.full((48,), 0.5), atol=2e-3, rtol=0)


# ------------------------------------------------------------------ damaged caches
def truncate(cache: TeacherCache) -> str:
    path = cache.directory / OUTPUTS_FILE
    path.write_bytes(path.read_bytes()[:-10])
    return r"has \d+ bytes, the manifest \d+ \(truncated\?\)"


def flip_a_byte(cache: TeacherCache) -> str:
    path = cache.directory / OUTPUTS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last logit
    path.write_bytes(bytes(data))
    return r"does not match the manifest's sha256 \(corrupted\)"


def garble_the_manifest(cache: TeacherCache) -> str:
    (cache.directory / MANIFEST_FILE).write_text('{"key": ')
    return "unreadable manifest"


def drop_the_manifest(cache: TeacherCache) -> str:
    (cache.directory / MANIFEST_FILE).unlink()
    return "no manifest: an interrupted build"


@pytest.mark.parametrize("damage", [truncate, flip_a_byte, garble_the_manifest, drop_the_manifest])
def test_a_damaged_cache_is_detected_and_rebuilt_with_a_warning(make_cfg, caplog, damage):
    datamodule, teacher, cache = loaded_cache(make_cfg())
    original = cache.outputs["logits"].clone()
    problem = damage(cache)
    again = teacher_cache(teacher, datamodule)
    with caplog.at_level(logging.WARNING, logger="kdlab.methods.teacher_cache"):
        assert again.load_or_build(teacher) == 48
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "kdlab.methods.teacher_cache"
    ]
    assert len(warnings) == 1
    assert str(cache.directory) in warnings[0] and "rebuilding" in warnings[0]
    assert re.search(problem, warnings[0])
    assert again.status == "built" and torch.equal(again.outputs["logits"], original)
    third = teacher_cache(teacher, datamodule)
    assert third.load_or_build(teacher) == 0 and third.status == "reused"


# ----------------------------------------------------------------- concurrent builds
def build_at_once(cfg: dict, barrier, results) -> None:
    """A process's build of the cache of ``cfg``, slowed to 0.2 s a batch so that the
    other process asks for it while this one is building."""
    datamodule, teacher = prepared(OmegaConf.create(cfg))
    cache = teacher_cache(teacher, datamodule)
    batches = cache.batches

    def slow():
        for batch in batches():
            time.sleep(0.2)
            yield batch

    cache.batches = slow
    barrier.wait()
    cache.load_or_build(teacher)
    results.put((cache.status, cache.key, cache.outputs["logits"].tolist()))


def test_two_processes_building_the_same_cache_leave_one_valid_cache(make_cfg):
    cfg = OmegaConf.to_container(make_cfg(), resolve=True)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=build_at_once, args=(cfg, barrier, results)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    found = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    # No lock: both build (unless one finds the other's cache published), and each
    # publishes a complete cache by renaming its own folder.
    assert "built" in [status for status, _, _ in found]
    assert found[0][1:] == found[1][1:]
    datamodule, teacher, cache = loaded_cache(make_cfg())
    assert cache.status == "reused" and cache.outputs["logits"].tolist() == found[0][2]
    assert sorted(p.name for p in cache.directory.iterdir()) == [MANIFEST_FILE, OUTPUTS_FILE]
    # Neither left a temporary folder.
    assert [p.name for p in cache.root.iterdir()] == [cache.key]


def test_a_builder_deletes_only_its_own_temporary_folders(make_cfg):
    """A builder publishing while another builds (as on two nodes): the first publishes,
    the second moves that cache aside and publishes its own; a third builder's temporary
    folder, still being written, is left alone."""
    datamodule, teacher = prepared(make_cfg())
    first, second = teacher_cache(teacher, datamodule), teacher_cache(teacher, datamodule)
    first.root.mkdir(parents=True)
    other = first.root / f".{first.key}.other-node.4242.x1y2.tmp"
    other.mkdir()
    (other / OUTPUTS_FILE).write_bytes(b"half written")
    batches = second.batches

    def meanwhile():
        first.load_or_build(teacher)  # publishes while `second` is half way through
        yield from batches()

    second.batches = meanwhile
    assert second.load_or_build(teacher) == 48
    assert (first.status, second.status) == ("built", "built")
    assert torch.equal(first.outputs["logits"], second.outputs["logits"])
    assert sorted(p.name for p in first.root.iterdir()) == [other.name, first.key]
    assert (other / OUTPUTS_FILE).read_bytes() == b"half written"
    third = teacher_cache(teacher, datamodule)
    assert third.load_or_build(teacher) == 0 and third.status == "reused"


def test_the_cache_needs_no_file_lock(make_cfg, monkeypatch):
    """Lustre mounted without flock refuses it (ENOSYS)."""
    datamodule, teacher = prepared(make_cfg())

    def refuse(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)
    cache = teacher_cache(teacher, datamodule)
    assert cache.load_or_build(teacher) == 48 and cache.status == "built"
    again = teacher_cache(teacher, datamodule)
    assert again.load_or_build(teacher) == 0 and again.status == "reused"


def test_a_rank_that_does_not_build_waits_for_rank_zeros_cache(make_cfg, monkeypatch):
    monkeypatch.setattr(kdlab.methods.teacher_cache, "POLL_SECONDS", 0.05)
    datamodule, teacher = prepared(make_cfg())
    builder, waiter = teacher_cache(teacher, datamodule), teacher_cache(teacher, datamodule)
    rank_zero = threading.Timer(0.5, builder.load_or_build, args=(teacher,))
    rank_zero.start()
    try:
        assert waiter.load_or_build(teacher, builds=False, wait_s=120) == 0
    finally:
        rank_zero.join()
    assert (builder.status, waiter.status) == ("built", "reused")
    assert torch.equal(waiter.outputs["logits"], builder.outputs["logits"])


def test_a_rank_waiting_for_a_cache_that_never_comes_fails_naming_its_folder(make_cfg):
    datamodule, teacher = prepared(make_cfg())
    cache = teacher_cache(teacher, datamodule)
    message = f"No valid teacher-output cache appeared in {cache.directory} within 0.2 s"
    with pytest.raises(TimeoutError, match=re.escape(message) + ".*task.cache_dir"):
        cache.load_or_build(teacher, builds=False, wait_s=0.2)
    assert cache.teacher_examples == 0 and not cache.root.exists()


def test_two_ddp_ranks_wait_for_one_build(tmp_path, glue_root, teacher_dir):
    run_dir = tmp_path / "run"
    overrides = [
        *fast_overrides(tmp_path, glue_root, teacher_dir, run_dir=run_dir),
        "trainer.max_epochs=2",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "eval.speed_batches=0",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_cli(overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("Teacher-output cache built") == 1
    assert output.count("Teacher-output cache reused") == 1
    # Both ranks' teacher work together: the one build, nothing in the two epochs.
    assert json.loads((run_dir / "metrics.json").read_text())["teacher_passes"] == 1.0


# ----------------------------------------------------------------- where it is refused
def corpus(tmp_path) -> list[str]:
    return [
        f"task.files=[{write_corpus(tmp_path / 'corpus')}/*.txt]",
        "task.max_seq_length=16",
        f"teacher.path={write_tiny_mlm_bert(tmp_path / 'mlm')}",
    ]


# Case: task, method, model (None: make_cfg's), extra overrides, the reason in the error.
REFUSED = {
    "mixkd": ("sst2", "mixkd", None, lambda tmp: [], "method=mixkd runs the teacher on mixed"),
    "backtranslation": (
        "sst2",
        "kd",
        None,
        lambda tmp: [
            "augment=backtranslation",
            f"task.augment.file={tmp / 'para.tsv'}",
            "task.augment.generate=false",
        ],
        "augment=backtranslation augments the training set",
    ),
    "masked-LM": ("corpus/local", "kd", None, corpus, "task=local is masked-LM"),
    "homodistil": (
        "corpus/local",
        "homodistil",
        "pruned",
        lambda tmp: [
            *corpus(tmp),
            "model.target.hidden_size=16",
            "model.target.num_attention_heads=2",
            "model.target.intermediate_size=32",
        ],
        "method=homodistil reads the teacher's hidden states",
    ),
    "no teacher": ("sst2", "finetune", None, lambda tmp: [], "method=finetune has no teacher"),
    "no cache_dir": (
        "sst2",
        "kd",
        None,
        lambda tmp: ["task.cache_dir=null"],
        r"task.cache_dir is null \(the cache is stored beside the dataset cache\)",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_cache_teacher_true_is_refused_where_it_is_not_valid(make_cfg, tmp_path, case):
    task, method, model, extra, reason = REFUSED[case]
    overrides = extra(tmp_path)
    auto = make_cfg(task=task, method=method, model=model, extra=overrides)
    validate(auto)  # null (the default) is silently off here
    assert re.search(reason, teacher_cache_refusal(auto))
    explicit = make_cfg(
        task=task, method=method, model=model, extra=[*overrides, "++method.cache_teacher=true"]
    )
    with pytest.raises(ConfigError, match=f"method.cache_teacher=true, but {reason}"):
        validate(explicit)


@pytest.mark.parametrize("method", ["kd", "pd"])
def test_kd_and_pd_accept_cache_teacher_true(make_cfg, method):
    cfg = make_cfg(method=method, extra=["method.cache_teacher=true"])
    validate(cfg)
    assert teacher_cache_refusal(cfg) is None


def test_mixkd_runs_its_teacher_live_and_counts_its_passes(make_cfg):
    metrics = kdlab.train.run(make_cfg(method="mixkd"))
    # One mixed-input teacher pass per batch: one pass over the training set per epoch.
    assert metrics["teacher_cache"] is None and metrics["teacher_passes"] == 1.0


def test_outputs_beyond_float16_are_refused_naming_the_key(make_cfg):
    datamodule, teacher = prepared(make_cfg())
    with torch.no_grad():
        teacher.classifier.bias.fill_(1e6)
    cache = teacher_cache(teacher, datamodule)
    with pytest.raises(ConfigError, match="reach 1e\\+06, beyond float16's range.*cache_teacher"):
        cache.load_or_build(teacher)
    assert not cache.directory.exists()
