"""Semantic segmentation metrics from a confusion matrix: IoU and accuracy per class, mIoU, mAcc, aAcc.

Definitions as in mmseg's evaluation (the authors' tool): over all pixels whose label is not the
ignore index, per class IoU = TP / (TP + FP + FN) and Acc = TP / (TP + FN); mIoU and mAcc average
the classes that occur in the labels or predictions (a class absent from both has NaN and is left
out of the mean); aAcc = correctly labelled pixels / labelled pixels.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .data import IGNORE_INDEX

__all__ = ["confusion_matrix", "segmentation_metrics"]


def confusion_matrix(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = label, columns = prediction."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    valid = label != ignore_index
    index = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def segmentation_metrics(matrix: torch.Tensor, classes: Sequence[str] | None = None) -> dict:
    """``{"mIoU", "mAcc", "aAcc", "per_class": [{"class", "IoU", "Acc", "pixels"}, ...]}`` (fractions)."""
    matrix = matrix.double()
    tp = matrix.diag()
    labelled = matrix.sum(1)
    predicted = matrix.sum(0)
    union = labelled + predicted - tp
    iou = tp / union  # NaN where a class is neither labelled nor predicted
    acc = tp / labelled
    names = list(classes) if classes is not None else [str(i) for i in range(len(tp))]
    total = labelled.sum()
    return {
        "mIoU": float(iou.nanmean()) if total > 0 else float("nan"),
        "mAcc": float(acc.nanmean()) if total > 0 else float("nan"),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "per_class": [
            {"class": name, "IoU": float(i), "Acc": float(a), "pixels": int(n)}
            for name, i, a, n in zip(names, iou, acc, labelled)
        ],
    }
