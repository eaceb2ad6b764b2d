"""Associative recall (`newllm.data.recall.make_recall_batch`): the accuracy of a model's greedy answers
at the queried values.

`recall_eval` scores one batch from an empty memory (a memory the model holds is set aside and put
back), in one forward call over the whole sequence. Training a model on the task first (the comparison
experiment trains a copy of each model) is `newllm.train.finetune.recall_train`: evaluation does not
depend on how a model was trained.
"""
from __future__ import annotations

import torch

from newllm.errors import NewLLMError


def recall_eval(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the greedy prediction at the labelled positions (label of t predicted at t - 1),
    from an empty memory, in one forward call over the whole sequence."""
    mask = labels[:, 1:] != -100
    if not bool(mask.any()):
        raise NewLLMError("recall_eval: no labelled positions (every label is -100)")
    p = next(model.parameters(), None)
    device = torch.device("cpu") if p is None else p.device
    with model.memory_aside(train=False), torch.no_grad():
        pred = model(ids.to(device)).logits[:, :-1].argmax(-1).cpu()
    return float((pred[mask] == labels[:, 1:][mask]).float().mean())
