"""Tiny models and GLUE-layout data written by the tests themselves."""

import random
from pathlib import Path

from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertTokenizerFast,
)

WORDS = (
    "the a movie film was is good great bad awful fun boring plot actor story not very "
    "really love hate it this that and but i you we they sun rain cat dog man woman"
).split()
POSITIVE = {"good", "great", "fun", "love"}


def write_tokenizer(directory: Path) -> BertTokenizerFast:
    """A WordPiece tokenizer over a few dozen words, saved to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(f"##{c}" for c in "sd")]
    # transformers 5 ignores `vocab_file=` here (every word became [UNK]); pass the mapping.
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_tiny_bert(directory: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A randomly initialised BERT (hidden 32, 2 layers, 2 heads) with a classifier head."""
    import torch

    tokenizer = write_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        problem_type="regression" if num_labels == 1 else "single_label_classification",
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def write_tiny_mlm_bert(directory: Path, seed: int = 0, heads: int = 4) -> Path:
    """A randomly initialised masked-LM BERT (hidden 32, 2 layers, ``heads`` heads, FFN 64)
    with a complete MLM head, so it can teach."""
    import torch

    tokenizer = write_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForMaskedLM(config).save_pretrained(directory)
    return directory


def write_corpus(directory: Path, n_lines: int = 200, seed: int = 0) -> Path:
    """Two plain-text files of random sentences over the tokenizer's words."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for part in ("a", "b"):
        lines = [_sentence(rng)[0] for _ in range(n_lines // 2)]
        (directory / f"{part}.txt").write_text("\n".join(lines) + "\n")
    return directory


def _sentence(rng: random.Random) -> tuple[str, int]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
    return " ".join(words), int(any(w in POSITIVE for w in words))


def write_glue(root: Path, n_train: int = 48, n_dev: int = 24, seed: int = 0) -> Path:
    """SST-2, RTE and STS-B folders in the official GLUE TSV layout under ``root``."""
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("dev", n_dev)):
        sst = ["sentence\tlabel"]
        rte = ["index\tsentence1\tsentence2\tlabel"]
        sts = [
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
        ]
        for i in range(n):
            a, label = _sentence(rng)
            b, _ = _sentence(rng)
            sst.append(f"{a} \t{label}")
            rte.append(f"{i}\t{a}\t{b}\t{'entailment' if label else 'not_entailment'}")
            sts.append(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{rng.uniform(0, 5):.3f}")
        for folder, lines in (("SST-2", sst), ("RTE", rte), ("STS-B", sts)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root
