"""Visual evaluation reports: precision-recall curves, a confusion matrix and a grid of predictions next to the
ground truth, written as PNG files (and to TensorBoard when a writer is given).

The PR curves are read from the COCO evaluator's own accumulated precision array (``eval['precision']``,
[T iou thresholds, R=101 recall points, K classes, A areas, M max-dets]), so every number on them agrees with
the reported AP: the mean of a class's curve is its AP50, the mean of all curves the AP50 of the table.

The confusion matrix counts, at one IoU and score threshold, what each ground-truth object became:
rows are true classes plus a last ``background`` row (detections matching no object), columns are predicted
classes plus a last ``missed`` column (objects no detection matched). Same-class pairs are matched first
exactly as COCO matches them (greedy by score, best IoU, crowd regions absorb detections without counting),
so the diagonal equals COCO's true positives at that IoU; left-over detections are then paired with left-over
objects of another class by best IoU (the confusions).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class PRCurves:
    """``recall`` [R]; ``per_class`` {category id: precision [R], NaN where undefined}; ``overall`` [R] (mean
    of the defined per-class values); ``ap`` {category id: AP at ``iou``}, ``overall_ap``; all at one IoU."""

    iou: float
    recall: np.ndarray
    per_class: dict[int, np.ndarray]
    overall: np.ndarray
    ap: dict[int, float]
    overall_ap: float


def pr_curves(precision: np.ndarray, rec_thrs, iou_thrs, cat_ids, iou: float | None = 0.5) -> PRCurves:
    """PR curves from COCOeval's ``eval['precision']`` [T, R, K, A, M] at area 'all' (A=0) and the largest
    max-dets (M=-1). ``iou`` picks one threshold; ``None`` averages over all of them (the AP .50:.95 view).
    COCO marks undefined entries (a class without ground truth) with -1; they become NaN and are left out of
    every mean, as COCO leaves them out."""
    precision = np.asarray(precision, dtype=np.float64)[:, :, :, 0, -1]  # [T, R, K]
    iou_thrs = np.asarray(iou_thrs, dtype=np.float64)
    if iou is None:
        chosen = precision
    else:
        index = int(np.argmin(np.abs(iou_thrs - iou)))
        if abs(iou_thrs[index] - iou) > 1e-6:
            raise ValueError(f"IoU {iou} is not one of the evaluated thresholds {iou_thrs.tolist()}")
        chosen = precision[index:index + 1]
    chosen = np.where(chosen > -1, chosen, np.nan)
    per_class, ap = {}, {}
    for k, cat_id in enumerate(cat_ids):
        values = chosen[:, :, k]
        if np.isnan(values).all():
            continue
        ap[int(cat_id)] = float(np.nanmean(values))
        per_class[int(cat_id)] = values.mean(0) if iou is not None else np.nanmean(values, 0)
    defined = chosen[~np.isnan(chosen)]
    with np.errstate(all="ignore"):
        overall = np.nanmean(chosen, axis=(0, 2)) if defined.size else np.full(chosen.shape[1], np.nan)
    return PRCurves(
        iou=-1.0 if iou is None else float(iou), recall=np.asarray(rec_thrs, dtype=np.float64), per_class=per_class,
        overall=overall, ap=ap, overall_ap=float(defined.mean()) if defined.size else -1.0,
    )


def _iou_matrix(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU [D, G] of xywh boxes; against a crowd region the union is the detection's own area (as COCO).

    Not dfine.ops.boxes.box_iou: COCO's crowd rule changes the union, the records are xywh lists, and the
    float64 numpy arithmetic keeps the threshold comparisons those of COCO's own matcher."""
    if len(dets) == 0 or len(gts) == 0:
        return np.zeros((len(dets), len(gts)))
    d1, d2 = dets[:, None, :2], dets[:, None, :2] + dets[:, None, 2:]
    g1, g2 = gts[None, :, :2], gts[None, :, :2] + gts[None, :, 2:]
    wh = np.clip(np.minimum(d2, g2) - np.maximum(d1, g1), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_d = (dets[:, 2] * dets[:, 3])[:, None]
    area_g = (gts[:, 2] * gts[:, 3])[None, :]
    union = np.where(crowd[None, :], area_d, area_d + area_g - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def confusion_matrix(gt: dict, records: list[dict], iou_threshold: float = 0.5, score_threshold: float = 0.25,
                     max_dets: int = 100) -> tuple[np.ndarray, list[int]]:
    """Counts [K+1, K+1] (rows: true class, then ``background``; columns: predicted class, then ``missed``) and
    the category ids of the first K rows (the ground truth's categories, sorted).

    Args:
        gt: COCO ground-truth dict (``images``, ``annotations``, ``categories``).
        records: COCO result records (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).
        iou_threshold: a pair matches at IoU >= this.
        score_threshold: detections below it are not counted.
        max_dets: per image and class, only the best ``max_dets`` detections count (COCO's maxDets).
    """
    cat_ids = sorted(c["id"] for c in gt.get("categories", []))
    index = {c: i for i, c in enumerate(cat_ids)}
    background = missed = len(cat_ids)
    matrix = np.zeros((len(cat_ids) + 1, len(cat_ids) + 1), dtype=np.int64)
    gts_by_image: dict[int, list[dict]] = {}
    for ann in gt.get("annotations", []):
        if ann["category_id"] in index:
            gts_by_image.setdefault(ann["image_id"], []).append(ann)
    dets_by_image: dict[int, list[dict]] = {}
    for r in records:
        if r["category_id"] in index:
            dets_by_image.setdefault(r["image_id"], []).append(r)
    for image_id in {im["id"] for im in gt.get("images", [])}:
        gts = gts_by_image.get(image_id, [])
        # COCO keeps the best max_dets per class before anything else; a stable sort keeps its tie order
        dets = []
        for cat in cat_ids:
            mine = [d for d in dets_by_image.get(image_id, []) if d["category_id"] == cat]
            order = np.argsort([-d["score"] for d in mine], kind="mergesort")[:max_dets]
            dets += [mine[i] for i in order if mine[i]["score"] >= score_threshold]
        dets = [dets[i] for i in np.argsort([-d["score"] for d in dets], kind="mergesort")]
        gt_boxes = np.array([g["bbox"] for g in gts], dtype=np.float64).reshape(-1, 4)
        crowd = np.array([bool(g.get("iscrowd", 0)) or bool(g.get("ignore", 0)) for g in gts], dtype=bool)
        det_boxes = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
        ious = _iou_matrix(det_boxes, gt_boxes, np.array([bool(g.get("iscrowd", 0)) for g in gts], dtype=bool))
        gt_cls = np.array([index[g["category_id"]] for g in gts], dtype=np.int64)
        gt_taken = np.zeros(len(gts), dtype=bool)
        det_state = ["free"] * len(dets)  # free | matched | ignored
        # 1) same class, COCO's greedy rule: best IoU, real objects before crowd regions, crowds reusable
        for d, det in enumerate(dets):
            cls = index[det["category_id"]]
            best, chosen = min(iou_threshold, 1 - 1e-10), -1
            for g in np.argsort(crowd, kind="mergesort"):
                if gt_cls[g] != cls or (gt_taken[g] and not crowd[g]):
                    continue
                if chosen > -1 and not crowd[chosen] and crowd[g]:
                    break
                if ious[d, g] < best:
                    continue
                best, chosen = ious[d, g], g
            if chosen > -1:
                if crowd[chosen]:
                    det_state[d] = "ignored"
                else:
                    gt_taken[chosen] = True
                    det_state[d] = "matched"
                    matrix[cls, cls] += 1
        # 2) left-overs: a detection of one class on an object of another
        for d, det in enumerate(dets):
            if det_state[d] != "free":
                continue
            free = np.flatnonzero(~gt_taken & ~crowd)
            if free.size:
                g = free[np.argmax(ious[d, free])]
                if ious[d, g] >= iou_threshold:
                    gt_taken[g] = True
                    det_state[d] = "matched"
                    matrix[gt_cls[g], index[det["category_id"]]] += 1
                    continue
            matrix[background, index[det["category_id"]]] += 1
        for g in np.flatnonzero(~gt_taken & ~crowd):
            matrix[gt_cls[g], missed] += 1
    return matrix, cat_ids


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(curves: PRCurves, names: dict[int, str], path: Path, mean_curves: PRCurves | None = None,
                   max_legend: int = 20):
    """PNG of every class's PR curve (thin) and the overall one (thick); returns the matplotlib figure."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    ranked = sorted(curves.per_class, key=lambda c: -curves.ap[c])
    for rank, cat_id in enumerate(ranked):
        label = f"{names.get(cat_id, cat_id)} {curves.ap[cat_id]:.3f}" if rank < max_legend else None
        ax.plot(curves.recall, curves.per_class[cat_id], linewidth=0.8, alpha=0.7, label=label)
    ax.plot(curves.recall, curves.overall, color="black", linewidth=2.5, label=f"all classes AP50 {curves.overall_ap:.3f}")
    if mean_curves is not None:
        ax.plot(mean_curves.recall, mean_curves.overall, color="black", linestyle="--", linewidth=2,
                label=f"all classes AP50:95 {mean_curves.overall_ap:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title="precision-recall (COCO, area all, 100 dets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2 if len(ranked) > 10 else 1)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def plot_confusion_matrix(matrix: np.ndarray, labels: list[str], path: Path, iou: float, score: float):
    """PNG of the confusion matrix, each true-class row normalised to 1 (counts annotated when it is small)."""
    plt = _figure()
    size = max(5.0, 0.35 * len(labels) + 3)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    rows = matrix.sum(1, keepdims=True)
    shown = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels=labels[:-1] + ["missed"], rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels=labels[:-1] + ["background"], fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix (IoU {iou}, score >= {score}; rows sum to 1)")
    if len(labels) <= 25:
        for (r, c), count in np.ndenumerate(matrix):
            if count:
                ax.text(c, r, str(count), ha="center", va="center", fontsize=6, color="white" if shown[r, c] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def prediction_grid(gt: dict, records: list[dict], image_root: str | os.PathLike, path: Path, names: dict[int, str],
                    num_images: int = 8, score_threshold: float = 0.4, tile: int = 320) -> np.ndarray:
    """PNG grid, one row per image: ground truth (left) beside the predictions scoring >= ``score_threshold``
    (right), on the first ``num_images`` images of ``gt`` (read from ``image_root``). Returns the grid [H, W, 3]."""
    import cv2

    from dfine.utils.drawing import class_colour, draw_boxes

    by_image: dict[int, list[dict]] = {}
    for r in records:
        by_image.setdefault(r["image_id"], []).append(r)
    anns: dict[int, list[dict]] = {}
    for a in gt.get("annotations", []):
        anns.setdefault(a["image_id"], []).append(a)
    cat_ids = sorted(c["id"] for c in gt.get("categories", []))
    rows = []
    for info in gt.get("images", [])[:num_images]:
        image = cv2.imread(str(Path(image_root) / info["file_name"]), cv2.IMREAD_COLOR)
        if image is None:
            logger.warning("prediction grid: cannot read %s; skipped", Path(image_root) / info["file_name"])
            continue
        scale = tile / max(image.shape[:2])
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)))
        halves = []
        for items, title in ((anns.get(info["id"], []), "ground truth"),
                             ([r for r in by_image.get(info["id"], []) if r["score"] >= score_threshold], "predicted")):
            canvas = image.copy()
            boxes = [[x * scale, y * scale, x * scale + w * scale, y * scale + h * scale] for x, y, w, h in (i["bbox"] for i in items)]
            colours = [class_colour(cat_ids.index(i["category_id"]) if i["category_id"] in cat_ids else 0)[::-1] for i in items]
            texts = [str(names.get(i["category_id"], i["category_id"])) + (f" {i['score']:.2f}" if "score" in i else "")
                     for i in items]
            draw_boxes(canvas, boxes, colours, texts, thickness=1, font_scale=0.35, filled_label=False)
            cv2.putText(canvas, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
            halves.append(cv2.copyMakeBorder(canvas, 0, tile - canvas.shape[0], 0, tile - canvas.shape[1] + 4, cv2.BORDER_CONSTANT))
        rows.append(np.concatenate(halves, axis=1))
    if not rows:
        raise ValueError(f"prediction grid: no readable validation image under {image_root}")
    grid = np.concatenate(rows, axis=0)
    cv2.imwrite(str(path), grid)
    return cv2.cvtColor(grid, cv2.COLOR_BGR2RGB)


def write_visual_reports(result, gt: dict, output_dir: str | os.PathLike, records: list[dict] | None = None,
                         image_root: str | os.PathLike | None = None, writer=None, step: int = 0,
                         iou_threshold: float = 0.5, score_threshold: float = 0.25, num_images: int = 8) -> dict[str, Path]:
    """``pr_curves.png``, ``confusion_matrix.png`` (+ ``confusion_matrix.json``) and, with ``image_root``,
    ``predictions_grid.png`` in ``output_dir``; each also goes to TensorBoard (``Report/...``) when ``writer``
    is given. ``result`` is the evaluator's EvalResult (it must carry ``precision``); ``records`` default to
    the ones it evaluated. Returns the written paths by name."""
    import json

    plt = _figure()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = records if records is not None else (getattr(result, "records", None) or [])
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt.get("categories", [])}
    paths: dict[str, Path] = {}
    if getattr(result, "precision", None) is not None:
        curves = pr_curves(result.precision, result.rec_thrs, result.iou_thrs, result.cat_ids, iou=0.5)
        mean = pr_curves(result.precision, result.rec_thrs, result.iou_thrs, result.cat_ids, iou=None)
        paths["pr_curves"] = output_dir / "pr_curves.png"
        fig = plot_pr_curves(curves, names, paths["pr_curves"], mean)
        if writer is not None:
            writer.add_figure("Report/pr_curves", fig, step)
        plt.close(fig)
    else:
        logger.warning("the evaluation result carries no precision array: PR curves skipped")
    matrix, cat_ids = confusion_matrix(gt, records, iou_threshold, score_threshold)
    labels = [names.get(c, str(c)) for c in cat_ids] + ["background"]
    paths["confusion_matrix"] = output_dir / "confusion_matrix.png"
    fig = plot_confusion_matrix(matrix, labels, paths["confusion_matrix"], iou_threshold, score_threshold)
    if writer is not None:
        writer.add_figure("Report/confusion_matrix", fig, step)
    plt.close(fig)
    (output_dir / "confusion_matrix.json").write_text(json.dumps(
        {"iou_threshold": iou_threshold, "score_threshold": score_threshold, "category_ids": cat_ids,
         "rows": "true class then background", "columns": "predicted class then missed", "counts": matrix.tolist()}, indent=1))
    if image_root is not None:
        paths["predictions_grid"] = output_dir / "predictions_grid.png"
        grid = prediction_grid(gt, records, image_root, paths["predictions_grid"], names, num_images)
        if writer is not None:
            writer.add_image("Report/predictions_grid", grid, step, dataformats="HWC")
    if writer is not None:
        writer.flush()
    logger.info("visual reports written: %s", ", ".join(str(p) for p in paths.values()))
    return paths


def write_reports_for_dataset(result, gt: dict, dataset, output_dir: str | os.PathLike, writer=None, step: int = 0) -> dict[str, Path]:
    """``write_visual_reports`` for an evaluation loop: images are read from the dataset's ``img_folder``, and a
    failure is logged, never raised (a picture is not worth losing an evaluation over)."""
    try:
        root = getattr(dataset, "img_folder", None)
        return write_visual_reports(result, gt, output_dir, image_root=root, writer=writer, step=step)
    except Exception as err:  # noqa: BLE001 - see docstring
        logger.warning("visual reports not written: %s: %s", type(err).__name__, err)
        return {}
