"""COCO evaluation (pycocotools) of torchvision detector outputs: box and mask AP."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["METRIC_NAMES", "coco_results", "coco_evaluate"]

# COCOeval.stats[0:6], in order
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_results(
    image_id: int,
    output: Mapping[str, torch.Tensor],
    label_to_category: Mapping[int, int],
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """One image's detector output as COCO result entries (xywh boxes, RLE masks if present)."""
    boxes = output["boxes"].detach().cpu().float()
    if boxes.numel() == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    rles = None
    if "masks" in output:
        from pycocotools import mask as mask_utils

        masks = (output["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        rles = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
    results = []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        if int(label) not in label_to_category:
            continue  # the background class never scores in torchvision's outputs; be safe
        entry = {"image_id": int(image_id), "category_id": label_to_category[int(label)],
                 "bbox": [round(v, 2) for v in box], "score": float(score)}
        if rles is not None:
            entry["segmentation"] = rles[i]
        results.append(entry)
    return results


def coco_evaluate(
    coco_gt: Any,
    results: Sequence[dict[str, Any]],
    iou_types: Iterable[str] = ("bbox",),
    image_ids: Sequence[int] | None = None,
) -> tuple[dict[str, float], str]:
    """Run COCOeval; returns ``({"bbox_AP": ..., "segm_AP50": ...}, printed summary)``.

    Metrics are fractions in [0, 1] as pycocotools computes them (AP averaged over IoU 0.50:0.95,
    AP50, AP75, and AP for small/medium/large objects; -1 where no object of that size exists).
    With no detections at all every metric is 0.
    """
    from pycocotools.cocoeval import COCOeval

    metrics: dict[str, float] = {}
    text = []
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type must be 'bbox' or 'segm'; got {iou_type!r}")
        # pycocotools takes a detection's area from its box when both are present: give each
        # evaluation only its own geometry
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        entries = [
            {k: v for k, v in r.items() if k != drop}
            for r in results if iou_type == "bbox" or "segmentation" in r
        ]
        if not entries:
            metrics.update({f"{iou_type}_{m}": 0.0 for m in METRIC_NAMES})
            text.append(f"{iou_type}: no detections")
            continue
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            coco_dt = coco_gt.loadRes(entries)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        text.append(f"{iou_type}:\n" + "\n".join(line for line in buffer.getvalue().splitlines()
                                                      if line.startswith(" Average")))
        metrics.update({f"{iou_type}_{m}": float(v) for m, v in zip(METRIC_NAMES, evaluator.stats[:6])})
    return metrics, "\n".join(text)
