"""Inference latency of deployed models side by side, in one process.

Every (model, runtime, batch, threads) pair is timed by :func:`median_ms` on the same random
token ids: ``runs`` calls after ``warmup`` untimed ones, the median reported (robust to the
other processes of a shared machine). "all" threads is every CPU core this process may use.
"""

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from torch import Tensor, nn

from kdlab.deploy.export import OnnxModel

BATCH_SIZES = (1, 32)


def median_ms(call: Callable[[], object], runs: int, warmup: int) -> float:
    """The median wall time of ``call()`` over ``runs`` calls after ``warmup`` calls, in ms."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@dataclass(frozen=True)
class Deployed:
    """One deployed model's runtimes to time.

    Args:
        name: its key in ``deploy.json``: ``model``, ``reference``.
        pytorch: the PyTorch model (eval mode).
        onnx: ONNX files by runtime name (``onnx_fp32``, ``onnx_int8``).
        head: the models' head.
        input_names: the inputs they take.
        vocab_size: ids are drawn below it.
    """

    name: str
    pytorch: nn.Module
    onnx: dict[str, Path]
    head: str
    input_names: list[str]
    vocab_size: int


def thread_counts() -> dict[str, int]:
    """``1`` and ``all`` (every core this process may run on) by label."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None  # Linux
    return {"1": 1, "all": len(usable) if usable else os.cpu_count() or 1}


def measure(models: list[Deployed], seq_len: int, runs: int, warmup: int) -> list[dict]:
    """Median latency of every model, runtime, batch size and thread count.

    Returns:
        One row per measurement: ``model``, ``runtime``, ``batch``, ``threads``, ``ms``.
    """
    generator = torch.Generator().manual_seed(0)
    rows = []
    previous_threads = torch.get_num_threads()
    try:
        for threads_label, threads in thread_counts().items():
            torch.set_num_threads(threads)
            runtimes = {
                deployed.name: {
                    "pytorch": deployed.pytorch,
                    **{
                        name: OnnxModel(path, deployed.head, threads)
                        for name, path in deployed.onnx.items()
                    },
                }
                for deployed in models
            }
            for batch in BATCH_SIZES:
                for deployed in models:
                    inputs = _inputs(deployed, batch, seq_len, generator)
                    for runtime, model in runtimes[deployed.name].items():
                        with torch.inference_mode():
                            ms = median_ms(lambda m=model, x=inputs: m(**x), runs, warmup)
                        row = {"model": deployed.name, "runtime": runtime, "batch": batch}
                        rows.append({**row, "threads": threads_label, "ms": round(ms, 3)})
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def _inputs(
    deployed: Deployed, batch: int, seq_len: int, generator: torch.Generator
) -> dict[str, Tensor]:
    """Random ids ``[batch, seq_len]``, every position attended, one segment."""
    shape = (batch, seq_len)
    values = {
        "input_ids": torch.randint(deployed.vocab_size, shape, generator=generator),
        "attention_mask": torch.ones(shape, dtype=torch.long),
        "token_type_ids": torch.zeros(shape, dtype=torch.long),
    }
    return {name: values[name] for name in deployed.input_names}


def latency_table(rows: list[dict], seq_len: int) -> Table:
    """The rows of :func:`measure` as a table: one line per model and runtime, one column per
    batch size and thread count, and each runtime's speed-up over the reference's PyTorch."""
    columns = sorted({(r["batch"], r["threads"]) for r in rows}, key=lambda c: (c[1] != "1", c))
    table = Table(title=f"Latency, ms (median), {seq_len} tokens")
    table.add_column("model")
    table.add_column("runtime")
    for batch, threads in columns:
        table.add_column(f"batch {batch}, {threads} thr.", justify="right")
    ms = {(r["model"], r["runtime"], r["batch"], r["threads"]): r["ms"] for r in rows}
    for model, runtime in dict.fromkeys((r["model"], r["runtime"]) for r in rows):
        cells = []
        for batch, threads in columns:
            value = ms[model, runtime, batch, threads]
            base = ms.get(("reference", "pytorch", batch, threads))
            speedup = f" ({base / value:.1f}x)" if base and model != "reference" else ""
            cells.append(f"{value:.1f}{speedup}")
        table.add_row(model, runtime, *cells)
    return table
