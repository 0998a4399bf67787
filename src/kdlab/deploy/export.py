"""ONNX export of a ``save_pretrained`` model, ONNX Runtime's graph optimisation, dynamic int8
quantisation, and an ONNX model that runs where a PyTorch one does.

Why ``torch.onnx.export`` and not ``optimum-onnx``: optimum-onnx 0.1.0 requires
``transformers<4.58`` (and ``optimum~=2.1``), and kdlab runs on transformers 5. torch's
exporter with ``dynamo=True`` (``torch.export`` + onnxscript) exports each family tested
(bert, roberta, electra, deberta-v2, modernbert) with |Δ logit| below 1e-6; the
older TorchScript exporter (``dynamo=False``) gave a BERT whose logits were off by 0.02 on
inputs of another shape than the example's.

Graph optimisation: ``onnxruntime.transformers.optimizer`` with its ``bert`` model type, on the
families whose layers are BERT's (:data:`GRAPH_OPTIMISED`). On graphs from the dynamo exporter
it fuses the residual LayerNorms (``SkipLayerNormalization``) and the FFN's GELU
(``BiasGelu``); its attention fusion finds no pattern there (``deploy.json`` records the fused
operators). ModernBERT is left out: its LayerNorms have no bias, on which the fusion fails.
"""

import inspect
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers import optimizer
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
)
from transformers.utils import ModelOutput

from kdlab.models.heads import HEADS, MODEL_INPUTS

# The heads a deployed model may have, and the outputs of each, as transformers returns them.
OUTPUT_TYPES: dict[str, type[ModelOutput]] = {
    "sequence_classification": SequenceClassifierOutput,
    "question_answering": QuestionAnsweringModelOutput,
}
# config.model_type of the families whose graph ONNX Runtime's BERT optimiser fuses (BERT's
# embeddings, post-LayerNorm layers with biases, GELU FFN). Parity is checked after it.
GRAPH_OPTIMISED = frozenset({"bert", "roberta", "xlm-roberta", "electra", "deberta-v2"})
OPSET = 18


def input_names(model: PreTrainedModel, tokenizer_inputs: list[str]) -> list[str]:
    """The tokenizer's outputs that ``model.forward`` takes, in kdlab's order (ModernBERT takes
    no ``token_type_ids`` whatever the tokenizer gives)."""
    taken = inspect.signature(model.forward).parameters
    return [name for name in MODEL_INPUTS if name in tokenizer_inputs and name in taken]


class _Logits(nn.Module):
    """The model with tensors in and the head's logits out, as ``torch.export`` needs."""

    def __init__(self, model: PreTrainedModel, head: str, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names
        self.outputs = list(HEADS[head].outputs.values())

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        outputs = self.model(**dict(zip(self.names, inputs, strict=True)))
        return tuple(outputs[name] for name in self.outputs)


def export_onnx(model: PreTrainedModel, head: str, example: dict[str, Tensor], path: Path) -> None:
    """Writes ``model`` as one ONNX file with dynamic batch and sequence axes.

    Args:
        model: a model with ``head``, in eval mode.
        head: a key of :data:`OUTPUT_TYPES`.
        example: model inputs ``[B, T]`` (``B``, ``T`` > 1: ``torch.export`` specialises on 1).
        path: the ``.onnx`` file written; its inputs are named as ``example``'s keys, its
            outputs as the model's (``logits``; ``start_logits``, ``end_logits``).
    """
    names = list(example)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # onnx_ir logs each initializer it deduplicates at INFO.
    with torch.no_grad(), warnings.catch_warnings(), _warnings_only():
        # Every input shares the two axes: the exporter names them once and says so.
        warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used")
        torch.onnx.export(
            _Logits(model, head, names).eval(),
            tuple(example.values()),
            str(path),
            input_names=names,
            output_names=list(HEADS[head].outputs.values()),
            opset_version=OPSET,
            dynamo=True,
            # One file: a single model's weights are far below protobuf's 2 GB.
            external_data=False,
            # One spec per input, inside the tuple of `forward`'s *inputs.
            dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),),
            verbose=False,
        )


def optimise_graph(path: Path, model_type: str) -> dict[str, int] | None:
    """Rewrites ``path`` with ONNX Runtime's transformer fusions where the family has BERT's
    graph (:data:`GRAPH_OPTIMISED`).

    Returns:
        The count of each operator fused (those found), or None when the family is not one
        the optimiser applies to.
    """
    if model_type not in GRAPH_OPTIMISED:
        return None
    # num_heads, hidden_size 0: read from the graph.
    with _warnings_only():
        optimised = optimizer.optimize_model(
            str(path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0
        )
        optimised.save_model_to_file(str(path))
        return {k: v for k, v in optimised.get_fused_operator_statistics().items() if v}


def quantise_int8(source: Path, target: Path, per_channel: bool) -> None:
    """Dynamic int8 quantisation of ``source``'s weights (activations quantised at run time).

    Args:
        per_channel: one scale per output channel of each weight instead of one per tensor.
    """
    with _warnings_only():
        quantize_dynamic(
            str(source), str(target), per_channel=per_channel, weight_type=QuantType.QInt8
        )


class _KnownNoise(logging.Filter):
    """Warnings that say nothing about this export: torch's exporter lists every torchvision
    operator it skips when torchvision is absent, and the quantiser suggests its
    pre-processing on every call."""

    MARKS = ("torchvision is not installed", "consider to run pre-processing before quantization")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(mark in record.getMessage() for mark in self.MARKS)


@contextmanager
def _warnings_only() -> Iterator[None]:
    """Within the block no logger passes INFO or below (the exporter's onnx_ir and ONNX
    Runtime's optimiser and quantiser log each step at INFO, on loggers named after their
    modules), nor the warnings of :class:`_KnownNoise`."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    noise = _KnownNoise()
    loggers = [
        logging.getLogger(),
        logging.getLogger("torch.onnx._internal.exporter._registration"),
    ]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield
    finally:
        logging.disable(previous)
        for logger in loggers:
            logger.removeFilter(noise)


def session(path: Path, threads: int = 0) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session of ``path`` (``threads`` 0: ONNX Runtime's default, one per
    physical core)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModel(nn.Module):
    """An ONNX file run by ONNX Runtime behind a ``transformers`` model's call: keyword tensors
    in, the head's ``ModelOutput`` out, so kdlab's evaluation runs it unchanged.

    Args:
        path: the ``.onnx`` file.
        head: the model's head (:data:`OUTPUT_TYPES` key).
        threads: ONNX Runtime's intra-op threads (0: its default).
        config: the exported model's config, which kdlab's evaluation reads as a
            ``transformers`` model's (``kdlab.models.heads.model_inputs``: its segments).
    """

    def __init__(
        self, path: Path, head: str, threads: int = 0, config: PretrainedConfig | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.session = session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_type = OUTPUT_TYPES[head]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, **inputs: Tensor) -> ModelOutput:
        feed = {name: inputs[name].cpu().numpy() for name in self.input_names}
        outputs = self.session.run(self.output_names, feed)
        return self.output_type(
            **{
                name: torch.from_numpy(value)
                for name, value in zip(self.output_names, outputs, strict=True)
            }
        )


def max_abs_difference(a: nn.Module, b: nn.Module, head: str, inputs: dict[str, Tensor]) -> float:
    """The largest |Δ| between the head's logits of ``a`` and ``b`` on ``inputs``."""
    with torch.no_grad():
        first, second = a(**inputs), b(**inputs)
    return max(
        float(np.abs(first[name].float().numpy() - second[name].float().numpy()).max())
        for name in HEADS[head].outputs.values()
    )
