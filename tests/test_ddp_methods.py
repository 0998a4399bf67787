"""kd, mixkd, pd and homodistil under DDP (2 CPU processes, gloo) train and evaluate as on
one device.

Each DDP run trains ``BATCH`` examples per process for ``STEPS`` optimizer steps; its
reference trains on one device with ``2 × BATCH`` per step, from the same initial weights
on the same training set. Dropout is off (``tests.helpers.NoDropout``) and every random
draw of a method is fixed, so the gradients of every step (all-reduced under DDP) and the
final weights must agree to float rounding. Each DDP run also has a validation split of
25 examples (odd: a padding sampler would count one twice) and checks that the metrics it
logs equal the single-process evaluation of the same weights in ``metrics.json``.

The masked-LM runs also accumulate gradients over 2 micro-batches, under
``tests.helpers.NCCLRules`` (a stand-in for NCCL's refusals, counting the collectives of a
step); runs with frozen parameters resume on another number of processes.
"""

import csv
import json
from pathlib import Path

import pytest
import torch

import kdlab.train
from kdlab.data.base import EpochSeededSampler, ResumableLoader
from kdlab.errors import ConfigError
from kdlab.methods import BaseMethod
from tests.conftest import QUIET_CPU_RUN, compose, fast_overrides, run_cli
from tests.fixtures import (
    write_corpus,
    write_glue,
    write_tiny_bert,
    write_tiny_mlm_bert,
    write_tiny_roberta,
    write_tokenizer,
)
from tests.helpers import Interrupted

BATCH = 8  # per process; the one-device reference trains on 2 × BATCH
STEPS = 3
DDP = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.precision=32-true"]
RECORD = [
    "+callbacks.no_dropout._target_=tests.helpers.NoDropout",
    "+callbacks.record._target_=tests.helpers.RecordSteps",
    f"+callbacks.record.steps={STEPS}",
]
# A learning rate large enough that each step's gradients depend on the earlier steps.
COMMON = [
    *RECORD,
    "optim.lr=1e-3",
    "optim.warmup_ratio=0",
    f"trainer.max_steps={STEPS}",
    "eval.speed_batches=0",
]
# Float rounding of sums over another split of the batch (fp32), relative to the step's
# largest gradient.
RTOL, ATOL_OF_LARGEST = 1e-4, 1e-5
# A step moves a weight by up to lr (1e-3): Adam divides each gradient by its own size, so
# the rounding of a near-zero gradient reaches the weights magnified.
WEIGHT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("epoch", [0, 1])
def test_each_process_holds_every_other_example_of_the_one_device_batch(epoch):
    def batches(sampler: EpochSeededSampler, size: int) -> list[list[int]]:
        sampler.set_epoch(epoch)
        order = list(sampler)
        return [order[i : i + size] for i in range(0, len(order), size)]

    one_device = batches(EpochSeededSampler(48, seed=5), 2 * BATCH)
    shares = [batches(EpochSeededSampler(48, 5, num_replicas=2, rank=r), BATCH) for r in (0, 1)]
    assert len(one_device) == len(shares[0]) == len(shares[1]) == STEPS
    for whole, first, second in zip(one_device, *shares, strict=True):
        assert whole[0::2] == first and whole[1::2] == second


def test_a_mid_epoch_loader_position_loads_only_into_the_same_share():
    def loader(replicas: int, batch_size: int) -> ResumableLoader:
        sampler = EpochSeededSampler(48, seed=5, num_replicas=replicas, rank=0)
        return ResumableLoader(range(48), batch_size=batch_size, sampler=sampler)

    def position_after(batches: int, replicas: int, batch_size: int) -> dict:
        source = loader(replicas, batch_size)
        iterator = iter(source)
        for _ in range(batches):
            next(iterator)
        return source.state_dict()

    # Two batches of 2 processes × 8 are the examples of two batches of 16 on one device,
    # but each process has read 16 of its 24: on one device that position is another one.
    with pytest.raises(ConfigError, match=r"by 2 training process\(es\) with task.batch_size=8"):
        loader(1, 2 * BATCH).load_state_dict(position_after(2, 2, BATCH))
    resumed = loader(2, BATCH)
    resumed.load_state_dict(position_after(2, 2, BATCH))
    whole = list(loader(2, BATCH))
    assert [batch.tolist() for batch in resumed] == [batch.tolist() for batch in whole[2:]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    write_tokenizer(root / "wordpiece")
    return {
        "root": root,
        # 48 = STEPS × 2 × BATCH training examples; 25 dev examples do not divide by 2.
        "glue": write_glue(root / "glue", n_train=STEPS * 2 * BATCH, n_dev=25),
        "teacher2": write_tiny_bert(root / "teacher2", num_labels=2),
        "teacher1": write_tiny_bert(root / "teacher1", num_labels=1),
        "mlm_teacher": write_tiny_mlm_bert(root / "mlm_teacher"),
        "corpus": write_corpus(root / "corpus"),
        # A byte-level BPE RoBERTa teacher for a student on the WordPiece tokenizer.
        "roberta2": write_tiny_roberta(root / "roberta2"),
        "wordpiece": root / "wordpiece",
    }


def glue_run(
    data,
    tmp: Path,
    method: str,
    task: str,
    extra: list[str],
    model: str | None = None,
    teacher: str | None = None,
) -> list[str]:
    teacher = data[teacher or ("teacher1" if task == "stsb" else "teacher2")]
    base = fast_overrides(tmp, data["glue"], teacher, task, method, model=model)
    return [*base, *COMMON, *extra]


def train_both(
    overrides: list[str], tmp: Path, one_device: list[str] = (), ddp: list[str] = ()
) -> tuple[Path, Path]:
    """One run on one device with twice the batch (in this process) and one on 2 DDP
    processes; returns their run directories. ``overrides`` must not set the batch size."""
    single, distributed = tmp / "single", tmp / "ddp"
    cfg = compose([*overrides, f"task.batch_size={2 * BATCH}", f"run_dir={single}", *one_device])
    kdlab.train.run(cfg)
    result = run_cli(
        [
            *overrides,
            f"task.batch_size={BATCH}",
            *DDP,
            f"run_dir={distributed}",
            f"hydra.run.dir={distributed}",
            *ddp,
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return single, distributed


def assert_same_steps(single: Path, distributed: Path) -> None:
    """Every step's gradients and the final weights of the DDP run equal the one-device
    run's; both DDP ranks end with the same weights."""
    reference = torch.load(single / "steps_rank0.pt", weights_only=True)
    ranks = [torch.load(distributed / f"steps_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(reference["grads"]) == len(ranks[0]["grads"]) == STEPS
    steps = zip(reference["grads"], ranks[0]["grads"], strict=True)
    for step, (expected, found) in enumerate(steps):
        assert found.keys() == expected.keys()
        largest = max(g.abs().max() for g in expected.values())
        assert largest > 0
        for name, grad in expected.items():
            where = f"step {step}, {name}"
            torch.testing.assert_close(
                found[name],
                grad,
                rtol=RTOL,
                atol=ATOL_OF_LARGEST * largest,
                msg=lambda m, where=where: f"{where}: {m}",
            )
    for name, weight in reference["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], weight, **WEIGHT_TOLERANCE)
        torch.testing.assert_close(
            ranks[1]["weights"][name], ranks[0]["weights"][name], rtol=0, atol=0
        )


def assert_logged_validation_is_the_final_evaluation(distributed: Path) -> dict:
    """The ``val/...`` values the DDP run logged at its last validation equal those of the
    single-process evaluation of the same weights (``metrics.json``); returns them."""
    with open(distributed / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if any(r[k] for k in r if k.startswith("val/"))]
    logged = {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}
    final = json.loads((distributed / "metrics.json").read_text())["student"]
    assert logged.keys() == {k for k in final if k.startswith("val/")}
    # Correlations near 0 are the difference of nearly equal sums of another order.
    assert logged == pytest.approx({k: final[k] for k in logged}, rel=1e-5, abs=1e-5)
    return logged


@pytest.mark.parametrize(
    ("method", "task", "cache"),
    [("kd", "sst2", "false"), ("pd", "stsb", "true")],
    ids=["kd-teacher", "pd-cache"],
)
def test_teacher_methods_train_as_on_one_device(data, tmp_path, method, task, cache):
    # The teacher runs on every batch (kd), or its outputs come from the teacher-output cache
    # (pd: built by the first run; its float16 outputs serve both).
    overrides = glue_run(data, tmp_path, method, task, [f"method.cache_teacher={cache}"])
    single, distributed = train_both(overrides, tmp_path)
    assert_same_steps(single, distributed)
    assert_logged_validation_is_the_final_evaluation(distributed)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_length_grouped_steps_train_as_on_one_device(data, tmp_path, accumulate):
    # task.group_by_length groups the order in optimizer steps over all processes and
    # micro-batches (16 or 32 examples here, on one device and on two), so each step trains
    # on the same examples as on one device. With 2 micro-batches, 48 examples are steps of
    # 32 and 16 an epoch, and the third step is in the second epoch.
    extra = [
        "trainer.max_epochs=2",
        "task.group_by_length=true",
        "method.cache_teacher=false",
        f"trainer.accumulate_grad_batches={accumulate}",
    ]
    overrides = glue_run(data, tmp_path, "kd", "sst2", extra)
    single, distributed = train_both(overrides, tmp_path)
    assert_same_steps(single, distributed)
    assert_logged_validation_is_the_final_evaluation(distributed)


def test_mixkd_trains_as_on_one_device(data, tmp_path):
    # MixKD's own random draws, fixed by the seed and the batch's position: both processes
    # draw partners and λ for the whole batch of 16 as one device does, and mix their
    # examples with partners on either process (gathered from the other).
    overrides = glue_run(data, tmp_path, "mixkd", "sst2", ["method.kd_alpha=0.5"])
    single, distributed = train_both(overrides, tmp_path)
    assert_same_steps(single, distributed)
    assert_logged_validation_is_the_final_evaluation(distributed)


def test_mixkd_across_tokenizers_trains_as_on_one_device(data, tmp_path):
    # A teacher with another tokenizer: each process gathers the student's ids and the
    # teacher's, each padded to its own longest sequence with its own model's pad id, and
    # both models mix the same partners with the same λ, as on one device.
    extra = [
        "method.kd_alpha=0.5",
        "task.group_by_length=false",  # sequences of unequal lengths on the two processes
        f"model.tokenizer={data['wordpiece']}",
    ]
    overrides = glue_run(data, tmp_path, "mixkd", "sst2", extra, teacher="roberta2")
    single, distributed = train_both(overrides, tmp_path)
    assert_same_steps(single, distributed)
    assert_logged_validation_is_the_final_evaluation(distributed)


def corpus_run(data, method: str, extra: list[str]) -> list[str]:
    """A run of ``method`` on the corpus task, its masks drawn once (``FixedMaskCorpus``)."""
    return [
        f"method={method}",
        "task=corpus/local",
        "task._target_=tests.helpers.FixedMaskCorpus",
        f"task.files=[{data['corpus']}/*.txt]",
        "task.max_seq_length=16",
        "task.validation_fraction=0.2",
        f"task.max_train_samples={STEPS * 2 * BATCH}",
        "task.max_eval_samples=25",
        "task.cache_dir=null",
        "task.eval_batch_size=16",
        f"teacher.path={data['mlm_teacher']}",
        *QUIET_CPU_RUN,
        *COMMON,
        *extra,
    ]


def homodistil_run(data, tmp: Path, extra: list[str]) -> list[str]:
    return corpus_run(
        data,
        "homodistil",
        [
            "model=pruned",
            "model.target.hidden_size=16",
            "model.target.num_attention_heads=2",
            "model.target.intermediate_size=32",
            "pruning.update_interval=1",
            "pruning.initial_warmup=0.3",
            "pruning.final_warmup=0.0",
            *extra,
        ],
    )


def test_homodistil_trains_as_on_one_device(data, tmp_path):
    # The masked positions of a batch differ in number between processes: the MLM and KL
    # terms are means over all of them, as on one device.
    single, distributed = train_both(homodistil_run(data, tmp_path, []), tmp_path)
    assert_same_steps(single, distributed)
    logged = assert_logged_validation_is_the_final_evaluation(distributed)
    assert logged["val/loss"] == pytest.approx(torch.tensor(logged["val/perplexity"]).log().item())


def attention_only_run(data, tmp: Path, extra: list[str] = ()) -> list[str]:
    """HomoDistil with its attention term alone on SST-2: its losses leave parts of the
    student unreached (BaseMethod.freeze_unreached freezes them)."""
    return glue_run(
        data,
        tmp,
        "homodistil",
        "sst2",
        [
            *[f"method.alpha_{term}=0" for term in ("mlm", "kl", "hidden", "emb")],
            # Not the teacher's copy, whose attention maps are the teacher's exactly.
            "model.random_init=true",
            "model.init_seed=7",
            "model.target.hidden_size=16",
            "model.target.num_attention_heads=1",
            "model.target.intermediate_size=32",
            "pruning.update_interval=1",
            "pruning.initial_warmup=0.3",
            "pruning.final_warmup=0.0",
            *extra,
        ],
        model="pruned",
    )


def test_homodistil_attention_only_freezes_what_it_leaves_unused(data, tmp_path):
    # The attention maps are read before the last layer's value projection, attention output
    # and FFN, and the classifier head is never run: those are frozen, on any number of
    # processes (BaseMethod.freeze_unreached). Padded sentences give the processes different
    # numbers of real-token pairs, the entries of the mean.
    single, distributed = train_both(attention_only_run(data, tmp_path), tmp_path)
    assert_same_steps(single, distributed)
    reached = torch.load(distributed / "steps_rank0.pt", weights_only=True)["grads"][0]
    unused = {
        "classifier.weight",
        "bert.pooler.dense.weight",
        "bert.encoder.layer.1.output.dense.weight",
    }
    assert (
        unused.isdisjoint(reached) and "bert.encoder.layer.1.attention.self.key.weight" in reached
    )
    assert_logged_validation_is_the_final_evaluation(distributed)


def test_freezing_on_one_process_changes_no_weight(data, tmp_path, monkeypatch, captured):
    # A parameter no loss reaches gets no gradient, and AdamW (and gradient clipping) skip
    # parameters without one: freezing them on one process too (so that the optimizer's
    # parameter groups do not depend on the process count) trains the same weights.
    overrides = [*attention_only_run(data, tmp_path), f"task.batch_size={2 * BATCH}"]
    kdlab.train.run(compose([*overrides, f"run_dir={tmp_path / 'frozen'}"]))
    assert not captured["module"].student.classifier.weight.requires_grad
    monkeypatch.setattr(BaseMethod, "freeze_unreached", lambda self, batch: [])
    kdlab.train.run(compose([*overrides, f"run_dir={tmp_path / 'trainable'}"]))
    frozen, trainable = (
        torch.load(tmp_path / run / "steps_rank0.pt", weights_only=True)
        for run in ("frozen", "trainable")
    )
    assert frozen["grads"][0].keys() == trainable["grads"][0].keys()
    for name, weight in trainable["weights"].items():
        torch.testing.assert_close(frozen["weights"][name], weight, rtol=0, atol=0, msg=name)


# Two epochs of STEPS steps, interrupted after the first (its checkpoints written).
TWO_EPOCHS = ["trainer.max_steps=-1", "trainer.max_epochs=2"]
INTERRUPT = [
    "+callbacks.interrupt._target_=tests.helpers.StopAfterEpoch",
    "+callbacks.interrupt.epoch=0",
]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> dict:
    """The final weights of the attention-only run over two epochs on one device."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    overrides = [*attention_only_run(data, tmp, TWO_EPOCHS), f"task.batch_size={2 * BATCH}"]
    kdlab.train.run(compose([*overrides, f"run_dir={tmp / 'run'}"]))
    return torch.load(tmp / "run" / "steps_rank0.pt", weights_only=True)["weights"]


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_resume_on_another_process_count(data, tmp_path, uninterrupted, first, then):
    # The optimizer state of a checkpoint loads only into the same parameter groups, so the
    # frozen set must not depend on the process count. With the state restored, the resumed
    # run ends with the uninterrupted run's weights (a fresh AdamW state would move each
    # weight by about lr = 1e-3 in its first step).
    overrides = attention_only_run(data, tmp_path, TWO_EPOCHS)
    run_dir = tmp_path / "run"

    def train(processes: int, extra: list[str]):
        """Train in this process, or on 2 DDP processes (returns their CLI's result)."""
        if processes == 1:
            batch = [f"task.batch_size={2 * BATCH}", f"run_dir={run_dir}"]
            return kdlab.train.run(compose([*overrides, *batch, *extra]))
        run = [f"task.batch_size={BATCH}", *DDP, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"]
        return run_cli([*overrides, *run, *extra])

    if first == 1:
        with pytest.raises(Interrupted):
            train(1, INTERRUPT)
    else:
        result = train(2, INTERRUPT)
        assert "simulated interruption after epoch 0" in result.stderr, result.stderr[-3000:]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS
    result = train(then, ["ckpt_path=last"])
    if then == 2:
        assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(then):
        final = torch.load(run_dir / f"steps_rank{rank}.pt", weights_only=True)["weights"]
        for name, weight in uninterrupted.items():
            torch.testing.assert_close(final[name], weight, **WEIGHT_TOLERANCE, msg=name)


# NCCL refuses collectives on CPU tensors; tests.helpers.NCCLRules stands in for it on gloo.
NCCL_RULES = ["trainer.strategy={_target_:tests.helpers.NCCLRules}"]


@pytest.mark.parametrize("method", ["homodistil", "kd"])
def test_masked_lm_methods_accumulate_as_on_one_device_under_nccl_rules(data, tmp_path, method):
    # Each process weighs its masked-LM means by its share of the masked tokens
    # (BaseMethod.rank_weights): a collective on every micro-batch, and the step's loss is
    # checked to be finite with one more. NCCLRules refuses any collective before the module
    # is on its device, as NCCL does on GPUs (BaseMethod.setup's probe runs before that).
    # 48 examples of 16 (one device) are 3 micro-batches an epoch: the steps are micro-batches
    # (0, 1), (2) at the epoch's end, then (0, 1) of the next epoch.
    extra = ["trainer.accumulate_grad_batches=2"]
    overrides = (
        homodistil_run(data, tmp_path, extra)
        if method == "homodistil"
        else corpus_run(
            data, "kd", ["model=bert_L2_H128", "model.num_layers=1", "model.hidden_size=64", *extra]
        )
    )
    single, distributed = train_both(overrides, tmp_path, ddp=NCCL_RULES)
    assert_same_steps(single, distributed)
    micro_batches = 5
    for rank in (0, 1):
        record = json.loads((distributed / f"collectives_rank{rank}.json").read_text())
        assert (record["micro_batches"], record["optimizer_steps"]) == (micro_batches, STEPS)
        # No barrier: one all-reduce of the rank weights per micro-batch, one of the loss
        # per optimizer step.
        assert record["hot"] == {"all_reduce": micro_batches + STEPS}
