"""Tiny models and GLUE-layout / SQuAD-format data written by the tests themselves."""

import json
import random
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import RobertaProcessing
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertTokenizerFast,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
)

WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "was",
    "is",
    "good",
    "great",
    "bad",
    "awful",
    "fun",
    "boring",
    "plot",
    "actor",
    "story",
    "not",
    "very",
    "really",
    "love",
    "hate",
    "it",
    "this",
    "that",
    "and",
    "but",
    "i",
    "you",
    "we",
    "they",
    "sun",
    "rain",
    "cat",
    "dog",
    "man",
    "woman",
]
POSITIVE = {"good", "great", "fun", "love"}

# Folder of each GLUE task in the official layout.
GLUE_DIRS = {
    "cola": "CoLA",
    "sst2": "SST-2",
    "mrpc": "MRPC",
    "qqp": "QQP",
    "stsb": "STS-B",
    "mnli": "MNLI",
    "qnli": "QNLI",
    "rte": "RTE",
    "wnli": "WNLI",
}
MNLI_LABELS = ("entailment", "neutral", "contradiction")


def write_tokenizer(directory: Path) -> BertTokenizerFast:
    """A WordPiece tokenizer over a few dozen words, saved to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(f"##{c}" for c in "sd")]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary itself (``vocab_file=`` is silently ignored there,
    # leaving only the special tokens).
    tokenizer = BertTokenizerFast(
        vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True
    )
    assert len(tokenizer) == len(vocab), "the tokenizer lost its vocabulary"
    tokenizer.save_pretrained(directory)
    return tokenizer


def _write_tiny(directory: Path, head_class: type, seed: int, **shape) -> Path:
    """A randomly initialised BERT (hidden 32, FFN 64, 64 positions; ``shape`` overrides,
    e.g. layers and heads) with ``head_class``'s head and the fixture tokenizer, saved to
    ``directory``."""
    import torch

    tokenizer = write_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=64,
        **shape,
    )
    head_class(config).save_pretrained(directory)
    return directory


def write_tiny_bert(directory: Path, num_labels: int = 2, seed: int = 0, layers: int = 2) -> Path:
    """A tiny BERT classifier (2 heads, ``layers`` layers); one output means regression."""
    return _write_tiny(
        directory,
        BertForSequenceClassification,
        seed,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_labels=num_labels,
        problem_type="regression" if num_labels == 1 else "single_label_classification",
    )


def write_bpe_tokenizer(directory: Path, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (RoBERTa's special tokens and pair template) trained on
    sentences of the fixture words, saved to ``directory``."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(300)]
    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(
        lines, vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    bpe.post_processor = RobertaProcessing(
        ("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>"))
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_tiny_roberta(directory: Path, num_labels: int = 2) -> Path:
    """A tiny random RoBERTa classifier on the BPE tokenizer (64 positions after RoBERTa's
    offset of 2), its head's biases moved off 0 (a head as a fine-tuned one looks)."""
    tokenizer = write_bpe_tokenizer(directory)
    import torch

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=num_labels,
        problem_type="regression" if num_labels == 1 else "single_label_classification",
    )
    model = RobertaForSequenceClassification(config)
    for name, param in model.classifier.named_parameters():
        if name.endswith("bias"):
            param.data.normal_(std=0.1)
    model.save_pretrained(directory)
    return directory


def write_tiny_qa_bert(directory: Path, seed: int = 0) -> Path:
    """A tiny BERT (2 layers, 2 heads) with a span (QA) head."""
    return _write_tiny(
        directory, BertForQuestionAnswering, seed, num_hidden_layers=2, num_attention_heads=2
    )


def write_squad(
    path: Path,
    n_articles: int = 4,
    questions_per_article: int = 4,
    unanswerable: bool = False,
    seed: int = 0,
) -> Path:
    """A SQuAD file in the official JSON format over the fixture vocabulary.

    Contexts have 20 to 50 words (several windows at ``max_seq_length`` 64); answers are
    1 to 3 consecutive context words, marked by character offset. With ``unanswerable``
    (v2.0) each article also gets a question of another article, marked ``is_impossible``.
    """
    rng = random.Random(seed)
    articles = []
    for a in range(n_articles):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 50))]
        context = " ".join(words) + "."
        starts = [sum(len(w) + 1 for w in words[:i]) for i in range(len(words))]
        qas = []
        for q in range(questions_per_article):
            first = rng.randrange(len(words))
            last = min(len(words), first + rng.randint(1, 3))
            answer = " ".join(words[first:last])
            assert context[starts[first] : starts[first] + len(answer)] == answer
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) + "?"
            qas.append(
                {
                    "id": f"a{a}q{q}",
                    "question": question,
                    "answers": [{"text": answer, "answer_start": starts[first]}],
                    **({"is_impossible": False} if unanswerable else {}),
                }
            )
        articles.append({"title": f"article {a}", "paragraphs": [{"context": context, "qas": qas}]})
    if unanswerable:
        # A question of the next article cannot be answered from this one's context.
        for a, article in enumerate(articles):
            donor = articles[(a + 1) % n_articles]["paragraphs"][0]["qas"][0]
            article["paragraphs"][0]["qas"].append(
                {
                    "id": f"a{a}-none",
                    "question": donor["question"],
                    "answers": [],
                    "plausible_answers": donor["answers"],
                    "is_impossible": True,
                }
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "v2.0" if unanswerable else "1.1", "data": articles}))
    return path


def _sentence(rng: random.Random) -> tuple[str, int]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
    return " ".join(words), int(any(w in POSITIVE for w in words))


def _rows(task: str, split: str, n: int, rng: random.Random) -> list[str]:
    """Header (where the task has one) and ``n`` rows of one GLUE file, official layout."""
    binary = ("0", "1")
    lines = {
        "cola": [],
        "sst2": ["sentence\tlabel"],
        "mrpc": ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"],
        "qqp": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"],
        "stsb": [
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
        ],
        "qnli": ["index\tquestion\tsentence\tlabel"],
        "rte": ["index\tsentence1\tsentence2\tlabel"],
        "wnli": ["index\tsentence1\tsentence2\tlabel"],
    }.get(task)
    if task == "mnli":
        extra = "\tlabel2\tlabel3\tlabel4\tlabel5" if split != "train" else ""
        lines = [
            "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
            f"sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1{extra}\tgold_label"
        ]
    for i in range(n):
        a, label = _sentence(rng)
        b, _ = _sentence(rng)
        ent = "entailment" if label else "not_entailment"
        if task == "cola":
            lines.append(f"gj04\t{label}\t{'' if label else '*'}\t{a}")
        elif task == "sst2":
            lines.append(f"{a} \t{label}")
        elif task == "mrpc":
            lines.append(f"{label}\t{1000 + i}\t{2000 + i}\t{a}\t{b}")
        elif task == "qqp":
            lines.append(f"{i}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}\t{binary[label]}")
        elif task == "stsb":
            lines.append(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{rng.uniform(0, 5):.3f}")
        elif task == "mnli":
            gold = MNLI_LABELS[i % 3]
            votes = f"\t{gold}" * (5 if split != "train" else 1)
            lines.append(
                f"{i}\t{i}\t{i}e\tfiction\t( {a} )\t( {b} )\t(S {a})\t(S {b})\t{a}\t{b}{votes}\t{gold}"
            )
        elif task == "qnli":
            lines.append(f"{i}\t{a} ?\t{b}\t{ent}")
        elif task == "rte":
            lines.append(f"{i}\t{a}\t{b}\t{ent}")
        elif task == "wnli":
            lines.append(f"{i}\t{a}\t{b}\t{label}")
    return lines


def write_glue(
    root: Path,
    n_train: int = 48,
    n_dev: int = 24,
    seed: int = 0,
    tasks: tuple[str, ...] = tuple(GLUE_DIRS),
) -> Path:
    """The nine GLUE task folders (or ``tasks``) in the official GLUE TSV layout under ``root``.

    CoLA has no header, MRPC starts with a UTF-8 byte-order mark, MNLI has ``dev_matched`` and
    ``dev_mismatched`` files with ``gold_label`` as the last of many columns.
    """
    rng = random.Random(seed)
    for task in tasks:
        folder = root / GLUE_DIRS[task]
        folder.mkdir(parents=True, exist_ok=True)
        files = {"train": n_train, "dev": n_dev}
        if task == "mnli":
            files = {"train": n_train, "dev_matched": n_dev, "dev_mismatched": n_dev}
        for split, n in files.items():
            lines = _rows(task, split, n, rng)
            (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_tiny_mlm_bert(directory: Path, seed: int = 0, heads: int = 4, layers: int = 2) -> Path:
    """A tiny masked-LM BERT (``layers`` layers, ``heads`` heads) with a complete MLM head,
    so it can teach."""
    return _write_tiny(
        directory, BertForMaskedLM, seed, num_hidden_layers=layers, num_attention_heads=heads
    )


def write_corpus(directory: Path, n_lines: int = 200, seed: int = 0) -> Path:
    """Two plain-text files of random sentences over the tokenizer's words."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for part in ("a", "b"):
        lines = [_sentence(rng)[0] for _ in range(n_lines // 2)]
        (directory / f"{part}.txt").write_text("\n".join(lines) + "\n")
    return directory
