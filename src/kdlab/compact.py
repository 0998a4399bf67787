"""``python -m kdlab.compact <checkpoint> <out_dir>``: a pruned student from a training
checkpoint, compacted to a smaller stock ``transformers`` model and saved with
``save_pretrained`` (plus the tokenizer of the run, when it can be found).

The checkpoint carries the student's class and config (``kdlab_student``), its weights
(``student.*``) and, from a pruning run, the masks in the state of the pruning callback; a
checkpoint of an unpruned run is exported as it is.

A non-empty output directory (another model, say a fine-tuned one) is refused unless
``--overwrite`` is given; the new model is then written into a hidden sibling folder that
replaces the directory once it is complete, so no file of the model it held remains, and an
interrupted export (Ctrl-C, a full disk) leaves the old model as it was.
"""

import argparse
import logging
from pathlib import Path

import torch
import transformers
from omegaconf import OmegaConf

from kdlab.errors import ConfigError
from kdlab.pruning import StructuredMasks, compacted_copy
from kdlab.pruning.callback import PruningCallback
from kdlab.rundir import RunDir, check_output_dir, unreadable_checkpoint, written_whole

log = logging.getLogger("kdlab")

_STUDENT = "student."


def load_student(checkpoint_path: Path) -> transformers.PreTrainedModel:
    """The (compacted, if pruned) student stored in a kdlab training checkpoint.

    Raises:
        ConfigError: for a path that is not a file, not a complete torch checkpoint, or not
            a kdlab training checkpoint.
    """
    if not checkpoint_path.is_file():
        raise ConfigError(
            f"checkpoint {checkpoint_path} does not exist: give a .ckpt of a kdlab run "
            "(<run dir>/checkpoints/best.ckpt or last.ckpt)."
        )
    problem = unreadable_checkpoint(checkpoint_path)
    if problem:
        raise ConfigError(
            f"checkpoint {checkpoint_path} cannot be read: {problem}. Give a .ckpt of a kdlab "
            "run (<run dir>/checkpoints/best.ckpt or last.ckpt)."
        )
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "kdlab_student" not in checkpoint:
        raise ConfigError(f"{checkpoint_path} is not a kdlab training checkpoint.")
    info = checkpoint["kdlab_student"]
    config = transformers.AutoConfig.for_model(**info["config"])
    model = getattr(transformers, info["architecture"])(config)
    state = checkpoint["state_dict"]
    weights = {k[len(_STUDENT) :]: v for k, v in state.items() if k.startswith(_STUDENT)}
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    pruning = checkpoint.get("callbacks", {}).get(PruningCallback.__name__)
    if pruning is None:
        return model.eval()
    masks = StructuredMasks.for_model(model)
    masks.load_state_dict(pruning["masks"])
    masks.install(model)
    return compacted_copy(model, masks).eval()


def _run_tokenizer(checkpoint_path: Path) -> str | None:
    """The tokenizer the run's student was built with, from ``<run_dir>/config.yaml``."""
    config_file = RunDir(checkpoint_path.resolve().parent.parent).config
    if not config_file.exists():
        return None
    model_cfg = OmegaConf.load(config_file).model
    return model_cfg.get("tokenizer") or model_cfg.get("path")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdlab.compact", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt of a kdlab run")
    parser.add_argument("out_dir", type=Path, help="where save_pretrained writes the model")
    parser.add_argument("--tokenizer", help="tokenizer to save alongside (default: the run's)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty out_dir once written"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_output_dir(args.out_dir, {"the checkpoint": args.checkpoint}, args.overwrite)
    model = load_student(args.checkpoint)
    name = args.tokenizer or _run_tokenizer(args.checkpoint)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name) if name else None
    if tokenizer is None:
        log.warning("No tokenizer found for %s; pass --tokenizer.", args.checkpoint)
    # out_dir (the model it held, with --overwrite) is replaced only by a complete export.
    with written_whole(args.out_dir) as partial:
        model.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
    c = model.config
    log.info(
        "Wrote %s: hidden %d, %d heads, FFN %d, %d parameters",
        args.out_dir,
        c.hidden_size,
        c.num_attention_heads,
        c.intermediate_size,
        sum(p.numel() for p in model.parameters()),
    )


if __name__ == "__main__":
    main()
