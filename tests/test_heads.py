"""Each head's description agrees with the model its auto class builds."""

import pytest
import torch
from transformers import BertConfig

from kdlab.losses import IGNORE_INDEX
from kdlab.models.heads import HEADS, forward, targets


def gold_fields(head: str, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    if head == "question_answering":
        return {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])}
    if head == "masked_lm":
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[0, [1, 3]] = input_ids[0, [1, 3]]
        labels[1, 5] = input_ids[1, 5]
        return {"labels": labels}
    return {"labels": torch.tensor([0, 1])}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_outputs_and_architecture_match_its_model(name):
    head = HEADS[name]
    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = head.auto_class.from_config(config).eval()
    assert head.name == name
    assert type(model).__name__.endswith(head.architecture)

    input_ids = torch.randint(5, 40, (2, 7))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    batch |= gold_fields(name, input_ids)
    with torch.no_grad():
        outputs = forward(model, batch, name)
    gold = targets(batch, name)
    assert set(gold) == set(head.outputs)
    for field, output in head.outputs.items():
        # One row of logits per gold value: examples, or a masked-LM head's graded tokens.
        assert outputs[output].size(0) == gold[field].size(0)
