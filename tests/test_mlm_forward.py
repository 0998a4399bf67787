"""Masked-LM heads are scored at the graded positions only, and `trainable=head` trains
just the head on a frozen encoder."""

import torch
from transformers import BertForMaskedLM

import kdlab.train
from kdlab.losses import IGNORE_INDEX
from kdlab.models.heads import forward, targets
from kdlab.pruning import Pruner
from kdlab.rundir import RunDir
from tests.fixtures import write_tiny_mlm_bert
from tests.test_homodistil import COMMON, compose, corpus_args, data  # noqa: F401


def masked_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab_size, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, [1, 4]] = input_ids[0, [1, 4]]
    labels[1, 7] = 3
    labels[2, [0, 2, 5]] = input_ids[2, [0, 2, 5]]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_graded_rows_equal_the_full_forward(tmp_path):
    model = BertForMaskedLM.from_pretrained(write_tiny_mlm_bert(tmp_path / "m")).eval()
    Pruner(model, target={"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32})
    model._kdlab_masks.hidden[::2] = 0  # a pruned model too: masks apply in both paths
    model._kdlab_masks.refresh()
    batch = masked_batch(model.config.vocab_size)
    rows = batch["labels"] != IGNORE_INDEX
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        graded = forward(model, batch, "masked_lm", output_hidden_states=True)
    assert graded.logits.shape == (6, model.config.vocab_size)
    torch.testing.assert_close(graded.logits, full.logits[rows])
    assert len(graded.hidden_states) == model.config.num_hidden_layers + 1
    assert targets(batch, "masked_lm")["labels"].tolist() == batch["labels"][rows].tolist()


def test_head_only_training_leaves_the_encoder_and_tied_decoder_alone(data, tmp_path):  # noqa: F811
    overrides = [
        *COMMON,
        *corpus_args(data),
        "method=mlm",
        "method.trainable=head",
        "model=pretrained",
        f"model.path={data['teacher']}",
        "optim.lr=1e-2",
        f"run_dir={tmp_path}",
    ]
    kdlab.train.run(compose(overrides))
    before = BertForMaskedLM.from_pretrained(data["teacher"]).state_dict()
    after = BertForMaskedLM.from_pretrained(RunDir(tmp_path).student).state_dict()
    for key, value in before.items():
        changed = not torch.equal(after[key], value)
        assert changed == (key.startswith("cls.predictions.") and "decoder.weight" not in key), key
