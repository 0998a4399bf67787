"""Tiny models and GLUE-layout / SQuAD-format data written by the tests themselves."""

import json
import random
from pathlib import Path

from transformers import (
    BertConfig,
    BertForQuestionAnswering,
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
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary itself (a path in `vocab_file` is ignored).
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
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


def write_tiny_qa_bert(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised BERT (hidden 32, 2 layers, 2 heads) with a span (QA) head."""
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
    )
    BertForQuestionAnswering(config).save_pretrained(directory)
    return directory


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
