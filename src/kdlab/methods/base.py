"""The LightningModule every method builds on.

It owns the student and the frozen teacher, the optimizer and schedule, evaluation and
metric logging; a method only says how its training losses are computed
(``compute_losses``). A method is built from its config by ``hydra.utils.instantiate``:
its hyper-parameters are keyword arguments whose annotations the config check reads
(``kdlab.validation``), and the run passes the models, the head, the split metrics and the
optimizer.
"""

import abc
import logging
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from kdlab.errors import NonFiniteLossError
from kdlab.losses import task_loss
from kdlab.methods.teacher_cache import TeacherCache
from kdlab.methods.traits import MethodTraits, check_head, check_traits
from kdlab.metrics import SplitMetrics
from kdlab.models.heads import HEADS, forward, targets, teacher_inputs
from kdlab.optim import Optim
from kdlab.rng import gather_rng_states, restore_rng_states

log = logging.getLogger(__name__)

TEACHER_PREFIX = "teacher."


class BaseMethod(L.LightningModule, abc.ABC):
    """Shared base of all methods.

    Args:
        name: the method's name (``method.name``: run names, ``metrics.json``).
        student: the model being trained.
        teacher: a frozen teacher, or ``None`` for methods without one.
        head: the task's head (``kdlab.models.heads.HEADS`` key): which outputs are trained against
            which batch targets.
        split_metrics: one per evaluation split, keyed by metric-key prefix: the validation
            dataloaders in order (``val``, and ``val_mm`` for MNLI), then ``test`` where the
            task has labelled test data. The datamodule provides them.
        optim: the optimizer and schedule (the ``optim`` config).
        trainable: ``all`` trains the whole student; ``head`` only its task head, on a
            frozen encoder kept in eval mode (a linear probe, or giving a pre-trained
            encoder a trained MLM head before it teaches). Parameters tied to the encoder
            (BERT's MLM decoder is the word-embedding matrix) stay frozen with it.
        cache_teacher: the teacher-output cache (:mod:`kdlab.methods.teacher_cache`): ``None``
            uses it wherever it is valid, ``True`` requires it (the config check refuses a
            run where it is not valid), ``False`` runs the teacher on every batch. The run
            attaches the cache (``teacher_cache``) when this allows it
            (:func:`kdlab.methods.traits.teacher_cache_for`).
    """

    # What the run reads of the method before building anything; a method states its own:
    # traits = MethodTraits(requires_teacher=False, ...).
    traits: ClassVar[MethodTraits] = MethodTraits()

    @classmethod
    def needs_teacher_head(cls, method_cfg: DictConfig) -> bool:
        """Whether this configuration of the method reads the teacher's task head."""
        return True

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Rules across config groups: those the method's traits imply
        (:func:`~kdlab.methods.traits.check_traits`), and a method's own.

        Raises:
            ConfigError: naming the setting to change.
        """
        check_traits(cls, cfg)

    def __init__(
        self,
        *,
        name: str,
        student: PreTrainedModel,
        teacher: PreTrainedModel | None = None,
        head: str,
        split_metrics: Mapping[str, SplitMetrics],
        optim: Optim,
        trainable: Literal["all", "head"] = "all",
        cache_teacher: bool | None = None,
    ) -> None:
        super().__init__()
        check_head(type(self), head)
        if self.traits.requires_teacher and teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher.")
        self.name = name
        self.student = student
        self.trainable = trainable
        if trainable == "head":
            student.base_model.requires_grad_(False)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.cache_teacher = cache_teacher
        self.teacher_cache: TeacherCache | None = None
        # Examples the teacher has run on during fitting (kept in checkpoints), and that
        # count in passes over the training set, all ranks together (each epoch's end).
        self.teacher_examples = 0
        self.teacher_passes: float | None = None
        self._teacher_counter = None
        self.optim = optim
        self.head = head
        self.head_outputs = HEADS[head].outputs
        self.eval_prefixes = [p for p in split_metrics if p != "test"]
        self.split_metrics = nn.ModuleDict(split_metrics)
        # The task loss of each evaluation split, weighted by the rows it averages: a metric
        # whose sums DDP processes add up. A NaN loss is replaced by NaN (kept, so that a
        # diverged student shows); nan_strategy="disable" would drop the weights too
        # (torchmetrics 1.9).
        self.eval_losses = nn.ModuleDict(
            {prefix: MeanMetric(nan_strategy=float("nan")) for prefix in split_metrics}
        )
        # Set while freeze_unreached's probe runs (see `distributed`).
        self._probing = False
        # The training loss summed over the micro-batches of the current optimizer step, on
        # the device: checked once per step (on_before_optimizer_step).
        self._step_loss: Tensor | None = None

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        # bf16-true/16-true precision casts the whole module with .to(dtype), which torchmetrics
        # lets through to its states (it guards .half() and the like only): sums over a split
        # in half precision lose most of their digits, or overflow in fp16. Lightning casts at
        # setup, when the states hold their defaults, so casting them back loses nothing.
        # Integer states (counts) are cast neither way.
        self.split_metrics.to(torch.float32)
        self.eval_losses.to(torch.float32)
        return self

    # ----------------------------------------------------------------- the method's part
    @abc.abstractmethod
    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Training losses of one batch: ``{"loss": total, <term>: value, ...}``."""

    # ------------------------------------------------------------------ head's outputs
    def forward_model(self, model: PreTrainedModel, batch: dict[str, Tensor], **options):
        """``model`` on the batch (a masked-LM head only at graded positions: see
        :func:`kdlab.models.heads.forward`)."""
        return forward(model, batch, self.head, **options)

    def logits(self, outputs: ModelOutput) -> dict[str, Tensor]:
        """A model's output logits keyed by the gold target each predicts."""
        return {field: outputs[name] for field, name in self.head_outputs.items()}

    def targets(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's gold targets, as :meth:`forward_model`'s logits meet them."""
        return targets(batch, self.head)

    # ----------------------------------------------------------------- unused weights
    def setup(self, stage: str) -> None:
        # Before DDP wraps the module: its reducer waits for a gradient of every trainable
        # parameter, and a configuration whose losses leave some unreached (HomoDistil
        # without its MLM and KL terms leaves the MLM head) would stall or fail. On one
        # process too (they get no gradient there, which AdamW and clipping skip), so that
        # the optimizer's parameter groups, which a checkpoint's state must match, do not
        # depend on the process count. The probe is the first batch of the whole training
        # order, the same on every rank, drawn and run in forked RNG streams (the masked-LM
        # collator masks from the global one). Lightning moves the module to its device and
        # wraps it in one step after this hook, so the probe issues no collective (see
        # `distributed`): NCCL refuses CPU tensors. Runs fitted on bare loaders (the
        # benchmarks) have no datamodule to probe.
        datamodule = self.trainer.datamodule
        if stage != "fit" or datamodule is None:
            return
        with torch.random.fork_rng(devices=[]):
            self.freeze_unreached(next(iter(datamodule.training_loader())))

    def freeze_unreached(self, batch: dict[str, Tensor]) -> list[str]:
        """Freeze the trainable parameters that no loss term reaches on ``batch``.

        One forward and backward pass on a probe batch, without any collective: losses are
        not weighted across processes in it (a weight never changes which parameters a loss
        reaches). Every rank runs it on the same batch and weights, so all ranks freeze the
        same parameters (and prune from the same gradients).

        Returns:
            The names of the frozen parameters.
        """
        trainable = self.trainable_parameters()
        self._probing = True
        try:
            self.compute_losses(batch)["loss"].backward()
        finally:
            self._probing = False
        frozen = [name for name, p in trainable if p.grad is None]
        for name, param in trainable:
            param.grad = None
            if name in frozen:
                param.requires_grad_(False)
        if frozen:
            log.info("Frozen (no loss term reaches them): %s", ", ".join(frozen))
        return frozen

    # ------------------------------------------------- DDP: means over varying counts
    @property
    def distributed(self) -> bool:
        """Whether losses are weighted across processes: under a trainer with more than one
        process, outside :meth:`freeze_unreached`'s probe."""
        return self._trainer is not None and self.trainer.world_size > 1 and not self._probing

    def rank_weights(self, counts: Tensor) -> Tensor:
        """Weights of means over this process's entries that make DDP's average of the
        processes' gradients the gradient of the mean over all their entries.

        That average is the gradient of a mean over the whole batch, as one device with
        all of it computes it, only where every process averages over as many entries;
        masked-LM terms average over the masked tokens, whose number varies from batch to
        batch (representation terms over real tokens, which padding varies). A mean over a
        process's ``n`` entries weighted by ``n / mean(n over processes)`` is its sum over
        the mean count, and the processes' average is then the sum over all their entries
        over their total count.

        Args:
            counts: ``[K]``: this process's number of entries of each of K means.

        Returns:
            ``[K]`` float weights (a collective under DDP: every process calls it); ones on
            a single process.
        """
        counts = counts.float()
        if not self.distributed:
            return torch.ones_like(counts)
        # A bare all-reduce: Lightning's strategy.reduce puts a barrier before it, a host
        # sync on every micro-batch. SUM, divided here: gloo has no AVG.
        total = counts.clone()
        torch.distributed.all_reduce(total)
        return counts / (total / self.trainer.world_size)

    def target_rows(self, batch: dict[str, Tensor]) -> int:
        """The rows the head's losses average over: examples, or the masked tokens of a
        masked-LM head."""
        return next(iter(self.targets(batch).values())).size(0)

    def weigh_head_losses(
        self, losses: dict[str, Tensor], batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``losses``, means over the head's target rows, weighted by :meth:`rank_weights`.

        Only a masked-LM head's rows vary in number between processes (every process gets
        as many examples a step): other heads' losses, and any losses on a single process,
        are returned as they are, without counting or a collective.
        """
        if self.head != "masked_lm" or not self.distributed:
            return losses
        # torch.full, not torch.tensor: a copy from the host would wait for the GPU.
        rows = torch.full((1,), self.target_rows(batch), device=batch["input_ids"].device)
        weight = self.rank_weights(rows)[0]
        return {name: value * weight for name, value in losses.items()}

    # ------------------------------------------------------------------------- teacher
    def on_train_start(self) -> None:
        # `from_pretrained` returns models in eval mode and Lightning keeps sub-module modes
        # as it finds them (validation restores them after it), so set them explicitly:
        # student trains (dropout on), teacher never does. At the start of training, not of
        # each epoch: a run resumed mid-epoch gets no on_train_epoch_start for that epoch.
        self.student.train()
        if self.trainable == "head":
            self.student.base_model.eval()
        if self.teacher is not None:
            self.teacher.eval()

    @torch.no_grad()
    def teacher_outputs(self, batch: dict[str, Tensor], **options):
        """The teacher's outputs on the same batch as the student, without gradients: from
        the teacher-output cache where one is loaded and the batch carries its rows (and no
        extra outputs are asked for; float32 then, the losses take any float dtype), else
        from the teacher, on its own tokenisation where the batch carries one
        (:func:`~kdlab.models.heads.teacher_inputs`)."""
        cache = self.teacher_cache
        if cache is not None and not options and cache.covers(batch):
            return cache.lookup(batch)
        return self.forward_model(self.teacher, teacher_inputs(batch), **options)

    def on_fit_start(self) -> None:
        # The teacher is on its device and in its precision now: build (or load) the cache
        # here, not at assembly.
        if self.teacher is None:
            return
        self._teacher_counter = self.teacher.base_model.register_forward_pre_hook(
            self._count_teacher_examples, with_kwargs=True
        )
        if self.teacher_cache is not None:
            # In the autocast (or dtype) context training computes the teacher in. Rank 0
            # builds; the others poll the filesystem for its result (no collective here).
            with self.trainer.precision_plugin.forward_context():
                self.teacher_cache.load_or_build(self.teacher, builds=self.trainer.is_global_zero)

    def on_fit_end(self) -> None:
        if self._teacher_counter is not None:
            self._teacher_counter.remove()
            self._teacher_counter = None

    def _count_teacher_examples(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Every teacher forward (kd's, mixkd's mixed inputs, homodistil's encoder, a cache
        # build, pruning's tracking) goes through its encoder.
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None:
            inputs = args[0]
        self.teacher_examples += inputs.size(0)

    def on_train_epoch_end(self) -> None:
        if self.teacher is None:
            return
        # The training split's size: passes over it read the same for any dataset size.
        rows = len(self.trainer.train_dataloader.dataset)
        examples = torch.tensor(float(self.teacher_examples), device=self.device)
        total = self.trainer.strategy.reduce(examples, reduce_op="sum")
        self.teacher_passes = float(total) / rows
        # The same value on every rank already; sync_dist only keeps Lightning from warning.
        self.log("train/teacher_passes", self.teacher_passes, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The teacher is fixed and reloaded from teacher.path; keeping it out of checkpoints
        # saves space. RNG states make a resumed run draw the same dropout masks. The
        # student's class and config let `python -m kdlab.compact` rebuild it.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]
        # Every rank's generators; a collective, as Lightning calls this hook on every rank.
        checkpoint["kdlab_rng_states_by_rank"] = gather_rng_states()
        checkpoint["kdlab_teacher_examples"] = self.teacher_examples
        checkpoint["kdlab_student"] = {
            "architecture": type(self.student).__name__,
            "config": self.student.config.to_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.teacher is not None:
            teacher_state = self.teacher.state_dict()
            checkpoint["state_dict"].update(
                {TEACHER_PREFIX + k: v for k, v in teacher_state.items()}
            )
        resuming = self._trainer is not None and self.trainer.state.fn == "fit"
        if resuming:
            restore_rng_states(checkpoint.get("kdlab_rng_states_by_rank", []), self.global_rank)
        if resuming:
            self.teacher_examples = checkpoint.get("kdlab_teacher_examples", 0)

    # ------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch)
        loss = losses["loss"]
        # Accumulated on the device; a sum is finite exactly when every term is (short of an
        # fp32 overflow, ~3.4e38).
        step_loss = loss.detach().float()
        self._step_loss = step_loss if self._step_loss is None else self._step_loss + step_loss
        batch_size = batch["input_ids"].size(0)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Once per optimizer step, after the backward passes of its micro-batches and before
        # gradient clipping and the optimizer change anything: one all-reduce under DDP and
        # one host sync, not a barrier, an all-reduce and a host sync per micro-batch. Every
        # rank sees the same sum, so all stop together.
        total, self._step_loss = self._step_loss, None
        if self.distributed:
            torch.distributed.all_reduce(total)
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"train/loss is {total.item()} (summed over the step's micro-batches and "
                f"processes) at step {self.global_step}; the run stops before the optimizer "
                "step so the weights and checkpoints stay finite."
            )

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters the optimizer updates: everything trainable outside the teacher."""
        return [
            (n, p)
            for n, p in self.named_parameters()
            if p.requires_grad and not n.startswith(TEACHER_PREFIX)
        ]

    def configure_optimizers(self):
        return self.optim.configure(
            self.trainable_parameters(), int(self.trainer.estimated_stepping_batches)
        )

    # ---------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict[str, Tensor], prefix: str) -> None:
        outputs = self.forward_model(self.student, batch)
        # In fp32 as the metrics are, whatever the student's precision (bf16-true logits).
        logits = {target: value.float() for target, value in self.logits(outputs).items()}
        loss = task_loss(logits, self.targets(batch))
        # Weighted by the rows the loss averages: the logged value is the mean over the
        # split's rows, however batches and DDP processes divide it. (Lightning's own
        # sync_dist mean truncates the summed batch sizes of unequal shares to an integer
        # mean, Lightning issue #21838.)
        self.eval_losses[prefix].update(loss.detach(), weight=self.target_rows(batch))
        self.split_metrics[prefix].update(outputs, batch)

    def validation_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._evaluate(batch, self.eval_prefixes[dataloader_idx])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _log_eval_metrics(self, prefixes: Sequence[str]) -> None:
        for prefix in prefixes:
            self.log(f"{prefix}/loss", self.eval_losses[prefix].compute())
            self.eval_losses[prefix].reset()
            metrics = self.split_metrics[prefix]
            for name, value in metrics.compute().items():
                self.log(f"{prefix}/{name}", value, prog_bar=prefix == "val")
            metrics.reset()

    def evaluation_files(self) -> dict[str, dict]:
        """JSON outputs of the last evaluation of each split (SQuAD's ``predictions.json``),
        by file name; splits other than ``val`` prefix theirs (``test_predictions.json``)."""
        return {
            (name if prefix == "val" else f"{prefix}_{name}"): content
            for prefix, metrics in self.split_metrics.items()
            for name, content in metrics.files().items()
        }

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics(self.eval_prefixes)

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics(["test"])
