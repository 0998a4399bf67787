""":func:`deploy`: a ``save_pretrained`` model directory to ONNX files, checked and timed.

Everything that can be refused is checked before any model loads (the model and reference
directories, their heads, the output directory, the vocabulary files); the output directory
is written as a hidden sibling that replaces it only once complete (``written_whole``), so a
failed deploy (an fp32 parity above :data:`PARITY_TOLERANCE`, Ctrl-C, a full disk) leaves it
as it was.
"""

import json
import logging
from importlib.metadata import version
from pathlib import Path

from omegaconf import DictConfig
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kdlab.components import target_of
from kdlab.deploy.evaluation import evaluate_models, task_config, task_datamodule
from kdlab.deploy.export import (
    OUTPUT_TYPES,
    OnnxModel,
    export_onnx,
    input_names,
    max_abs_difference,
    optimise_graph,
    quantise_int8,
)
from kdlab.deploy.latency import Deployed, latency_table, measure
from kdlab.deploy.vocabulary import check_prunable, kept_ids, prune_vocabulary
from kdlab.errors import ConfigError
from kdlab.models.build import ModelSource, count_parameters, position_limit
from kdlab.models.heads import HEADS, model_inputs
from kdlab.rundir import DEPLOY_RECORD, check_output_dir, written_whole
from kdlab.summary import table_console

log = logging.getLogger("kdlab")

PARITY_TOLERANCE = 1e-4
ONNX_FILE, INT8_FILE, REFERENCE_DIR = "model.onnx", "model_int8.onnx", "reference"
# Parity inputs when no task is given (--eval): sentences of different lengths, padded into
# one batch, so that masked positions are part of the check.
PARITY_TEXTS = (
    "the movie was good",
    "i really love this film and the story, but the actor was not very good",
    "boring.",
    "they hate it",
    "a great plot is not enough when the dialogue is this awful and the pacing this slow",
    "we saw the sun and the rain",
    "it is fun",
    "this is the film that you will love, or the one that you will hate",
)


PARITY_INPUTS = "fixed texts (kdlab.deploy.deployment.PARITY_TEXTS)"


class ParityError(RuntimeError):
    """The fp32 ONNX model's logits differ from the PyTorch model's by more than allowed."""


def deploy(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    int8: bool = False,
    per_channel: bool = True,
    prune_vocab: list[str] | DictConfig | None = None,
    eval_overrides: list[str] | DictConfig | None = None,
    reference: str | Path | None = None,
    eval_reference: bool = True,
    latency: bool = False,
    seq_len: int | None = None,
    runs: int = 20,
    warmup: int = 3,
    overwrite: bool = False,
) -> dict:
    """Exports ``model_dir`` to ONNX in ``out_dir`` and returns what ``deploy.json`` holds.

    Args:
        model_dir: a ``save_pretrained`` model with a sequence-classification or
            question-answering head and its tokenizer (a run's ``student/``).
        out_dir: receives ``model.onnx`` (``model_int8.onnx``), ``config.json``, the
            tokenizer files (and the pruned model's weights) and ``deploy.json``.
        int8: also write the dynamically int8-quantised ``model_int8.onnx``.
        per_channel: int8 scales per output channel rather than per weight tensor.
        prune_vocab: text files (one text a line), or ``["task=<name>", *overrides]`` (or a
            composed config: a pipeline stage's) for the task's training and validation
            inputs: keep only their tokens and the special ones.
        eval_overrides: ``["task=<name>", *overrides]`` (or a composed config): the task's dev
            metrics for the PyTorch model and each ONNX file, and parity on its first dev
            batch.
        reference: a second model (the teacher), deployed the same way into
            ``out_dir/reference``; both are then timed side by side.
        eval_reference: evaluate the reference too with ``eval_overrides`` (a pipeline's
            deploy stage does not: its teacher's stage has its figures).
        latency: time the model (and the reference) even without ``reference``.
        seq_len: tokens per timed sequence (default: the ``max_seq_length`` of the task of
            ``eval_overrides`` or ``prune_vocab``, else 128).
        runs: timed calls per measurement (the median is kept).
        warmup: untimed calls before them.
        overwrite: replace a non-empty ``out_dir``.

    Raises:
        ConfigError: for a model, output directory or vocabulary that cannot be used, before
            anything is written.
        ParityError: when the fp32 ONNX logits differ from PyTorch's by more than
            :data:`PARITY_TOLERANCE`; ``out_dir`` is left as it was.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    sources = {"model": model_dir, **({"reference": Path(reference)} if reference else {})}
    heads = {role: check_model_dir(path, role) for role, path in sources.items()}
    check_output_dir(out_dir, {f"the {role}": path for role, path in sources.items()}, overwrite)
    vocabulary_files = [] if _is_task(prune_vocab) else [Path(f) for f in prune_vocab or ()]
    for file in vocabulary_files:
        if not file.is_file():
            raise ConfigError(f"--prune-vocab: {file} is not a file.")
    if runs < 1 or warmup < 0:
        raise ConfigError(
            f"--runs must be at least 1 and --warmup at least 0, not {runs}, {warmup}."
        )
    if eval_overrides and not _is_task(eval_overrides):
        raise ConfigError(f"--eval takes task=<name> [overrides...], not {eval_overrides[0]!r}.")
    eval_cfg = _task_cfg(eval_overrides) if eval_overrides else None
    evaluated = [role for role in sources if role == "model" or eval_reference]
    if eval_cfg is not None:
        for role in evaluated:
            check_task_fits(eval_cfg, sources[role], heads[role], role)
    prune_cfg = _task_cfg(prune_vocab) if _is_task(prune_vocab) else None
    task_cfg = eval_cfg or prune_cfg
    if seq_len is None:
        seq_len = int(task_cfg.task.max_seq_length) if task_cfg else 128

    with written_whole(out_dir) as partial:
        record: dict = {}
        deployed = []
        for role, path in sources.items():
            target = partial if role == "model" else partial / REFERENCE_DIR
            target.mkdir(exist_ok=True)
            result, runtimes = _deploy_one(
                role,
                path,
                target,
                heads[role],
                prune_cfg,
                vocabulary_files,
                int8=int8,
                per_channel=per_channel,
                eval_cfg=eval_cfg if role in evaluated else None,
            )
            record[role] = result
            deployed.append(runtimes)
        if latency or reference:
            rows = measure(deployed, seq_len, runs, warmup)
            record["latency"] = {"seq_len": seq_len, "runs": runs, "warmup": warmup, "rows": rows}
            table_console().print(latency_table(rows, seq_len))
        record["versions"] = {
            name: version(name) for name in ("torch", "transformers", "onnx", "onnxruntime")
        }
        (partial / DEPLOY_RECORD).write_text(json.dumps(record, indent=2))
    log.info("Deployed %s to %s", model_dir, out_dir)
    return record


def check_model_dir(path: Path, role: str = "model") -> str:
    """The head of the ``save_pretrained`` model at ``path``.

    Raises:
        ConfigError: for a path that is not a model directory with its tokenizer (a run
            directory: naming its ``student/``), or a model whose head cannot be deployed.
    """
    problem = ModelSource(tokenizer=True).violation(str(path))
    if problem is None and not path.is_dir():
        problem = "does not exist"
    if problem:
        raise ConfigError(f"{role} directory {path} {problem}.")
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    for name, head in HEADS.items():
        if name in OUTPUT_TYPES and any(a.endswith(head.architecture) for a in architectures):
            return name
    supported = ", ".join(f"{n} (*{HEADS[n].architecture})" for n in OUTPUT_TYPES)
    raise ConfigError(
        f"{role} directory {path} holds a {', '.join(architectures) or 'model without a head'}"
        f" (config.json's architectures); deploy exports the heads {supported}."
    )


def check_task_fits(cfg: DictConfig, model_dir: Path, head: str, role: str = "model") -> None:
    """Refuses to evaluate a model on a task of another head or number of labels.

    Raises:
        ConfigError: naming both.
    """
    task_head = target_of(cfg, "task").head
    labels = cfg.task.get("labels") if task_head == "sequence_classification" else None
    wanted = 1 if labels is None else len(labels)
    num_labels = AutoConfig.from_pretrained(model_dir).num_labels
    if task_head != head or (head == "sequence_classification" and num_labels != wanted):
        raise ConfigError(
            f"--eval task={cfg.task.name} has a {task_head} head"
            + (f" with {wanted} outputs" if task_head == "sequence_classification" else "")
            + f"; the {role} in {model_dir} has a {head} head"
            + (f" with {num_labels} outputs." if head == "sequence_classification" else ".")
        )


def _is_task(spec: list[str] | DictConfig | None) -> bool:
    return isinstance(spec, DictConfig) or bool(spec) and spec[0].startswith("task=")


def _task_cfg(spec: list[str] | DictConfig) -> DictConfig:
    """The composed config of ``["task=<name>", *overrides]``; a config as it is."""
    return spec if isinstance(spec, DictConfig) else task_config(spec)


def _deploy_one(
    role: str,
    model_dir: Path,
    out_dir: Path,
    head: str,
    prune_cfg: DictConfig | None,
    vocabulary_files: list[Path],
    *,
    int8: bool,
    per_channel: bool,
    eval_cfg: DictConfig | None,
) -> tuple[dict, Deployed]:
    """Deploys one model into ``out_dir``; returns its record and its runtimes to time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pruning = prune_cfg is not None or bool(vocabulary_files)
    if pruning:
        # Before the model loads: texts that yield no token are refused first.
        check_prunable(tokenizer, str(model_dir))
        token_ids = _vocabulary_ids(tokenizer, prune_cfg, vocabulary_files)
        keep = kept_ids(tokenizer, token_ids)
    model = HEADS[head].auto_class.from_pretrained(model_dir).eval()
    record = {
        "source": str(model_dir),
        "head": head,
        "family": model.config.model_type,
        "parameters": count_parameters(model),
    }
    vocabulary = None
    if pruning:
        before = (len(tokenizer), count_parameters(model))
        tokenizer = prune_vocabulary(model, tokenizer, keep)
        model.save_pretrained(out_dir)
        vocabulary = {
            "from": _describe(prune_cfg, vocabulary_files),
            "kept_tokens": len(keep),
            "tokens_before": before[0],
            "parameters_before": before[1],
            "parameters_after": count_parameters(model),
            "weights_bytes_before": _weights_bytes(model_dir),
            "weights_bytes_after": _weights_bytes(out_dir),
        }
        record["parameters"] = vocabulary["parameters_after"]
    else:
        model.config.save_pretrained(out_dir)
    record["vocabulary"] = vocabulary
    tokenizer.save_pretrained(out_dir)

    names = input_names(model, tokenizer.model_input_names)
    datamodule = task_datamodule(eval_cfg, tokenizer) if eval_cfg is not None else None
    parity_inputs = _parity_inputs(model, tokenizer, names, datamodule)
    onnx_path = out_dir / ONNX_FILE
    export_onnx(model, head, parity_inputs, onnx_path)
    record["inputs"] = names
    record["graph_optimisation"] = optimise_graph(onnx_path, model.config.model_type)
    files = {"onnx_fp32": onnx_path}
    if int8:
        quantise_int8(onnx_path, out_dir / INT8_FILE, per_channel)
        files["onnx_int8"] = out_dir / INT8_FILE
    record["int8"] = {"per_channel": per_channel} if int8 else None
    record["files"] = {name: path.name for name, path in files.items()}
    record["bytes"] = {name: path.stat().st_size for name, path in files.items()}

    onnx_models = {name: OnnxModel(path, head, config=model.config) for name, path in files.items()}
    differences = {
        name: max_abs_difference(model, onnx, head, parity_inputs)
        for name, onnx in onnx_models.items()
    }
    record["parity"] = {
        "inputs": "first dev batch" if datamodule is not None else PARITY_INPUTS,
        "shape": list(parity_inputs["input_ids"].shape),
        "tolerance_fp32": PARITY_TOLERANCE,
        "max_abs_diff": differences,
    }
    if differences["onnx_fp32"] > PARITY_TOLERANCE:
        raise ParityError(
            f"{model_dir}: the ONNX model's logits differ from PyTorch's by up to "
            f"{differences['onnx_fp32']:.3g} (> {PARITY_TOLERANCE:g}) on "
            f"{record['parity']['inputs']}; nothing was written."
        )
    record["eval"] = None
    if datamodule is not None:
        record["eval"] = {
            "task": eval_cfg.task.name,
            **evaluate_models({"pytorch": model, **onnx_models}, datamodule, eval_cfg),
        }
    runtimes = Deployed(
        name=role,
        pytorch=model,
        onnx=files,
        head=head,
        input_names=names,
        vocab_size=model.get_input_embeddings().num_embeddings,
    )
    return record, runtimes


def _vocabulary_ids(
    tokenizer: PreTrainedTokenizerBase, task_cfg: DictConfig | None, files: list[Path]
) -> set[int]:
    """The ids of the tokens the texts produce (the task's, as its datamodule tokenises its
    training and validation inputs, truncation included, or each line of ``files``).

    Raises:
        ConfigError: when the texts produce no token (no text, or only special tokens).
    """
    if task_cfg is not None:
        datamodule = task_datamodule(task_cfg, tokenizer)
        rows = list(datamodule.train_split()["input_ids"])
        for loader in datamodule.val_dataloader(by_length=False):
            rows += [batch["input_ids"].flatten().tolist() for batch in loader]
    else:
        lines = [line for f in files for line in f.read_text().splitlines() if line.strip()]
        rows = tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else []
    found = {i for row in rows for i in row} - set(tokenizer.all_special_ids)
    if not found:
        raise ConfigError(
            f"--prune-vocab: {_describe(task_cfg, files)} yields no tokens but special ones: "
            "give files with text (one text a line)."
        )
    return found


def _describe(task_cfg: DictConfig | None, files: list[Path]) -> str:
    if task_cfg is not None:
        return f"task {task_cfg.task.name} (training and validation inputs)"
    return ", ".join(str(f) for f in files)


def _parity_inputs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, names: list[str], datamodule
) -> dict[str, Tensor]:
    """A batch ``[B, T]`` of the model's inputs: the task's first dev batch, or
    :data:`PARITY_TEXTS`."""
    if datamodule is not None:
        batch = next(iter(datamodule.val_dataloader(by_length=False)[0]))
        return {k: v for k, v in model_inputs(batch, model).items() if k in names}
    # At most the positions the model embeds: a saved tokenizer need not know them.
    limit, _ = position_limit(model.config)
    if limit is not None:
        limit = min(limit, tokenizer.model_max_length)
    encoded = tokenizer(
        list(PARITY_TEXTS), padding=True, truncation=True, max_length=limit, return_tensors="pt"
    )
    return {name: encoded[name] for name in names}


def _weights_bytes(directory: Path) -> int:
    """The size of a ``save_pretrained`` directory's weight files."""
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))
