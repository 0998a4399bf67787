"""Vocabulary pruning: a model and tokenizer that keep only the tokens some texts need.

The kept tokens are those the tokenizer produces on the texts, plus every special token. The
input embedding matrix (and a masked-LM decoder and its bias, where the model has one) keeps
their rows, in the old order; the tokenizer's ``tokenizer.json`` keeps their entries,
renumbered alike. Only the generic ``transformers`` APIs are used (``get_input_embeddings``,
``get_output_embeddings``, ``config.vocab_size``), so any family prunes the same way.

Tokenizers: WordPiece (BERT, ELECTRA, the MiniLMs): a word made of dropped pieces becomes the
unknown token. BPE (RoBERTa's byte-level BPE): the single characters (every byte, for
byte-level BPE) are kept too, and every token a kept token is merged from, with the merges
among kept tokens in their order; so the kept texts encode as before (each merge their
encoding applied is kept and still the first among those that apply), and an unseen word
encodes as kept pieces, down to single bytes, not as an unknown token. BPE with a subword
prefix or suffix, and Unigram (SentencePiece) vocabularies are refused.
"""

import copy
import json
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdlab.errors import ConfigError

PRUNABLE = ("WordPiece", "BPE")
# The config attributes that hold token ids, remapped with the vocabulary.
_TOKEN_ID_ATTRIBUTES = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "cls_token_id",
    "unk_token_id",
    "mask_token_id",
)


def check_prunable(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Refuses a tokenizer whose vocabulary this module cannot prune.

    Raises:
        ConfigError: naming the tokenizer's model type and ``where`` it comes from.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = None if backend is None else json.loads(backend.to_str())["model"]
    kind = None if model is None else model["type"]
    if kind not in PRUNABLE:
        raise ConfigError(
            f"--prune-vocab: the tokenizer of {where} is a {kind or 'slow (Python)'} tokenizer; "
            f"vocabulary pruning supports {', '.join(PRUNABLE)} tokenizers (tokenizer.json)."
        )
    if kind == "BPE" and (
        model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
    ):
        raise ConfigError(
            f"--prune-vocab: the BPE tokenizer of {where} marks subwords with a prefix or suffix; "
            "vocabulary pruning supports BPE without them (RoBERTa's byte-level BPE)."
        )


def kept_ids(tokenizer: PreTrainedTokenizerBase, token_ids: Iterable[int]) -> list[int]:
    """The sorted ids of ``token_ids`` and of every special token; for a BPE tokenizer also of
    every single character and of every token a kept one is merged from."""
    keep = set(token_ids) | set(tokenizer.all_special_ids)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model["type"] == "BPE":
        vocab = model["vocab"]
        token_of = {i: token for token, i in vocab.items()}
        made_from: dict[str, list[tuple[str, str]]] = {}
        for first, second in map(_pair, model["merges"]):
            made_from.setdefault(first + second, []).append((first, second))
        kept = {token_of[i] for i in keep if i in token_of} | {t for t in vocab if len(t) == 1}
        todo = list(kept)
        while todo:
            for pair in made_from.get(todo.pop(), ()):
                new = set(pair) - kept
                kept |= new
                todo += new
        keep |= {vocab[token] for token in kept}
    return sorted(keep)


def _pair(merge: str | list[str]) -> tuple[str, str]:
    """A merge of ``tokenizer.json`` (``"a b"``, or ``["a", "b"]`` since tokenizers 0.20)."""
    first, second = merge.split(" ") if isinstance(merge, str) else merge
    return first, second


def prune_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, keep: list[int]
) -> PreTrainedTokenizerBase:
    """Keeps the rows ``keep`` of ``model``'s vocabulary matrices (in place) and returns the
    tokenizer that numbers them ``0 .. len(keep) - 1``.

    Args:
        model: any ``transformers`` model with input embeddings.
        tokenizer: a fast tokenizer of :data:`PRUNABLE` type (:func:`check_prunable`).
        keep: sorted old ids to keep (:func:`kept_ids`).
    """
    index = torch.tensor(keep)
    new_id = {old: new for new, old in enumerate(keep)}
    layers = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m]
    # Each vocabulary-sized tensor once (a decoder tied to the embeddings shares its weight),
    # then every module holding it gets the kept rows: a masked-LM head's bias is the
    # decoder's (BERT's cls.predictions.bias), which tie_weights would not shrink.
    kept_rows: dict[int, nn.Parameter] = {}
    for layer in layers:
        for name in ("weight", "bias"):
            old = getattr(layer, name, None)
            if old is not None and id(old) not in kept_rows:
                kept_rows[id(old)] = nn.Parameter(old.detach()[index].clone())
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            if id(param) in kept_rows:
                setattr(module, name, kept_rows[id(param)])
    for layer in layers:
        _resized(layer, len(keep), new_id)
    config = model.config.get_text_config()
    config.vocab_size = len(keep)
    for name in _TOKEN_ID_ATTRIBUTES:
        old = getattr(config, name, None)
        if isinstance(old, int):
            setattr(config, name, new_id.get(old))
    model.tie_weights()
    return _pruned_tokenizer(tokenizer, keep)


def _resized(layer: nn.Module, size: int, new_id: dict[int, int]) -> None:
    """An embedding's or vocabulary projection's size attributes, after its rows were kept."""
    if isinstance(layer, nn.Embedding):
        layer.num_embeddings = size
        if layer.padding_idx is not None:
            layer.padding_idx = new_id.get(layer.padding_idx)
    elif isinstance(layer, nn.Linear):
        layer.out_features = size


def _pruned_tokenizer(
    tokenizer: PreTrainedTokenizerBase, keep: list[int]
) -> PreTrainedTokenizerBase:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    token_of = {i: token for token, i in spec["model"]["vocab"].items()}
    # Added tokens (the special ones) may lie outside the model's own vocabulary.
    token_of.update({added["id"]: added["content"] for added in spec["added_tokens"]})
    new_id = {token_of[old]: new for new, old in enumerate(keep)}
    spec["model"]["vocab"] = {t: i for t, i in new_id.items() if t in spec["model"]["vocab"]}
    if "merges" in spec["model"]:
        spec["model"]["merges"] = [
            merge
            for merge in spec["model"]["merges"]
            if all(t in new_id for t in (*_pair(merge), "".join(_pair(merge))))
        ]
    for added in spec["added_tokens"]:
        added["id"] = new_id[added["content"]]
    processor = spec.get("post_processor") or {}
    # TemplateProcessing (BERT's [CLS] A [SEP]) names the ids of the tokens it inserts.
    for special in processor.get("special_tokens", {}).values():
        special["ids"] = [new_id[token] for token in special["tokens"]]
    # BertProcessing and RobertaProcessing hold [token, id] pairs.
    for key in ("cls", "sep"):
        if key in processor:
            processor[key][1] = new_id[processor[key][0]]
    pruned = copy.deepcopy(tokenizer)
    # The fast tokenizer's backend is the vocabulary; save_pretrained writes it as
    # tokenizer.json, which AutoTokenizer loads.
    pruned._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return pruned
