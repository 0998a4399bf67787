"""Training-step cost of each method variant of run.py on the same batches, relative to kd.

The methods take turns on every batch (forward + backward of one training step), so a
change in machine load during the measurement affects all of them alike; the first batch
is a warm-up. Uses the fine-tuned teacher of ``run.py`` and its ``bert3`` student setup::

    KDLAB_DATA_DIR=/path/to/glue OMP_NUM_THREADS=1 python experiments/mixkd/step_time.py

On a loaded machine keep ``OMP_NUM_THREADS=1``: multi-threaded kernels of small models then
mostly wait for each other and the timings measure the load rather than the methods.
"""

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from run import COMMON, METHODS, TASKS  # the experiment's method variants (run.py, same folder)

from kdlab.components import validate
from kdlab.rundir import RunDir
from kdlab.train import CONF_DIR, Assembly, assemble

HERE = Path(__file__).resolve().parent


def method_config(method: str, args: argparse.Namespace, teacher_dir: Path) -> DictConfig:
    """The composed config of one method variant on ``run.py``'s student setup."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                *METHODS[method],
                "model=bert3",
                "teacher=local",
                f"teacher.path={teacher_dir}",
                f"task={args.task}",
                f"task.max_seq_length={args.seq}",
                f"task.batch_size={args.batch_size}",
                "seed=1",  # the training order of the timed batches
                *COMMON,
                "run_dir=/tmp/kdlab-step-time",
            ],
        )


def training_module(parts: Assembly):
    """The run's method module, in training mode as at the start of an epoch."""
    module = parts.method
    module.train()
    module.on_train_epoch_start()
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--seq", type=int, help="task.max_seq_length (default: run.py's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--teacher", help="teacher directory (default: run.py's for the task)")
    args = parser.parse_args()
    args.seq = args.seq or TASKS[args.task]["seq"]

    teacher_dir = args.teacher or RunDir(HERE / "outputs" / f"teacher-{args.task}").student
    modules, datamodule = {}, None
    for method in METHODS:
        cfg = method_config(method, args, teacher_dir)
        validate(cfg)
        parts = assemble(cfg)
        if datamodule is None:  # every variant's serves the same batches (data, seed, size)
            datamodule = parts.datamodule
        modules[method] = training_module(parts)

    batches = list(itertools.islice(datamodule.train_dataloader(), args.batches + 1))
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i, batch in enumerate(batches):
        for method, module in modules.items():
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            module.compute_losses(batch)["loss"].backward()
            if i > 0:
                times[method].append(time.perf_counter() - start)
    kd = statistics.median(times["kd"])
    result = {
        "task": args.task,
        "batch_size": args.batch_size,
        "max_seq_length": args.seq,
        "batches": args.batches,
        "threads": torch.get_num_threads(),
        "median_s": {m: statistics.median(t) for m, t in times.items()},
        "relative_to_kd": {m: statistics.median(t) / kd for m, t in times.items()},
    }
    out = HERE / f"step_time-{args.task}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))  # noqa: T201 (a script's report)


if __name__ == "__main__":
    main()
