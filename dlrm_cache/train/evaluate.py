"""A split's AUC, log loss and normalized entropy, over every rank."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torchmetrics

from dlrm_cache.data.loader import ParquetBatches

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(runtime, loader: ParquetBatches, device: torch.device) -> dict:
    """AUROC, log loss and normalized entropy over a whole split, over all ranks (the cache serves
    misses from the host, writes nothing); ``runtime``: the run's ``EmbeddingRuntime``. Padding rows
    (label -1, evening out a last batch over ranks) are left out. NE is the log loss over the entropy of
    the split's click rate: 1.0 is what always predicting that rate scores, lower is better (the figure
    CTR teams report beside AUC)."""
    model = runtime.model
    model.eval()
    auroc = torchmetrics.classification.BinaryAUROC(sync_on_compute=runtime.sharded).to(device)
    loss_sum, n, clicks = torch.zeros((), dtype=torch.float64), 0, 0.0
    for batch in loader.batches(epoch=0):
        logits = model(batch.dense_features.to(device), runtime.sparse_input(batch)).squeeze(1)
        labels = batch.labels.to(device)
        real = labels >= 0
        logits, labels = logits[real], labels[real]
        loss_sum += torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, reduction="sum"
        ).cpu()
        n += len(labels)
        clicks += float(labels.sum())
        auroc.update(torch.sigmoid(logits), labels.long())
    model.train()
    totals = torch.tensor([float(loss_sum), n, clicks], dtype=torch.float64, device=device)  # NCCL: device
    if runtime.sharded:
        dist.all_reduce(totals)
    if totals[1] == 0:  # an empty split (a tiny dataset): nothing to score
        log.warning("the %s split is empty: no AUC or log loss", loader.split)
        return {"auc": float("nan"), "logloss": float("nan"), "ne": float("nan"), "samples": 0}
    logloss = float(totals[0] / totals[1])
    ne = logloss / _entropy(float(totals[2] / totals[1]))
    auc = float(auroc.compute())
    if totals[2] == 0 or totals[2] == totals[1]:  # one class only: no pair to rank
        log.warning(
            "the %s split's %d samples are all %s: AUC and NE are undefined (null in the outputs)",
            loader.split, int(totals[1]), "clicks" if totals[2] else "non-clicks",
        )  # fmt: skip
        auc = float("nan")
    return {"auc": auc, "logloss": logloss, "ne": ne, "samples": int(totals[1])}


def _entropy(rate: float) -> float:
    """Of a click rate, in nats (NaN for a split of one class, where NE is undefined)."""
    if rate <= 0 or rate >= 1:
        return float("nan")
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
