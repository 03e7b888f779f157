"""The training loss as a component: the ``loss`` config group, and the one function that computes a
batch's summed loss (``ds_hydra.loss.step.loss_sum``) for the trainer, evaluation, the memory preflight
and the throughput probe.

* ``cross_entropy`` (the default): next-token cross-entropy in fp32 over the labelled positions;
* ``chunked_cross_entropy``: the same numbers, with the model's output layer and the cross-entropy
  applied a chunk of tokens at a time, so the (batch, seq, vocab) logits never exist at once.

A loss returns the **sum** over the label tokens of a batch; the trainer divides by the label tokens
of the whole optimizer step (every micro-batch, every rank), so a step's gradient is that of the mean
over its label tokens however the batch is split. Importing this package imports no torch.
"""
from ds_hydra.lazy import lazy_attributes

__all__ = ["CrossEntropyLoss", "ChunkedCrossEntropyLoss", "build_loss", "loss_sum", "mean_loss", "label_tokens", "run_model"]

__getattr__ = lazy_attributes(__name__, {
    "CrossEntropyLoss": "cross_entropy",
    "ChunkedCrossEntropyLoss": "cross_entropy",
    "build_loss": "step",
    "loss_sum": "step",
    "mean_loss": "step",
    "label_tokens": "step",
    "run_model": "inputs",
})
