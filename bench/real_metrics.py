"""Task metrics of bench/real_models.py: CTC greedy decoding and text accuracy for the recognisers,
mask IoU for the segmentation-style text detector, box decoding, NMS and detection F1 against FP32's
detections for the YOLO-style detectors. Pure numpy; the paired sign test is bench_memory's."""
from __future__ import annotations

import numpy as np

Detections = tuple[np.ndarray, np.ndarray]  # boxes [n, 4] x1 y1 x2 y2, classes [n] int


def ctc_greedy(logits: np.ndarray, blank: int = 0) -> list[list[int]]:
    """Best path of [N, T, C] scores per sample: the argmax per step, repeats merged, blanks dropped."""
    best = logits.argmax(-1)
    keep = np.ones_like(best, dtype=bool)
    keep[:, 1:] = best[:, 1:] != best[:, :-1]
    keep &= best != blank
    return [row[mask].tolist() for row, mask in zip(best, keep)]


def decode(logits: np.ndarray, charset: list[str], blank: int = 0) -> list[str]:
    """ctc_greedy's indices through ``charset`` (index i is charset[i]; an index past it is dropped)."""
    return ["".join(charset[i] for i in path if i < len(charset)) for path in ctc_greedy(logits, blank)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions and substitutions cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_accuracy(predicted: list[str], truth: list[str]) -> tuple[float, float]:
    """(line accuracy: exact matches, character accuracy: 1 - total edit distance / total truth length)."""
    lines = float(np.mean([p == t for p, t in zip(predicted, truth)]))
    errors = sum(edit_distance(p, t) for p, t in zip(predicted, truth))
    return lines, max(0.0, 1.0 - errors / max(sum(map(len, truth)), 1))


def mask_iou(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over samples (axis 0) of the IoU of two boolean masks; a sample where both are empty counts 1."""
    axes = tuple(range(1, reference.ndim))
    inter = (reference & candidate).sum(axes)
    union = (reference | candidate).sum(axes)
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, m] IoU of x1 y1 x2 y2 boxes."""
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (class-agnostic), best score first."""
    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size:
        keep.append(order[0])
        order = order[1:][box_iou(boxes[order[:1]], boxes[order[1:]])[0] <= threshold]
    return np.array(keep, dtype=np.int64)


def detection_f1(reference: list[Detections], candidate: list[Detections], iou: float = 0.5) -> float:
    """F1 of ``candidate``'s boxes against ``reference``'s over all images: a candidate box is a hit when
    it overlaps an unmatched reference box of its class by at least ``iou`` (greedy, in candidate order,
    which is score order from the decoders below). 1.0 when neither has any box."""
    hits = found = wanted = 0
    for (ref_boxes, ref_cls), (boxes, cls) in zip(reference, candidate):
        wanted, found = wanted + len(ref_boxes), found + len(boxes)
        if not len(ref_boxes) or not len(boxes):
            continue
        overlap = box_iou(boxes, ref_boxes) * (cls[:, None] == ref_cls[None])
        free = np.ones(len(ref_boxes), bool)
        for row in overlap:
            j = int(np.argmax(np.where(free, row, -1)))
            if free[j] and row[j] >= iou:
                free[j], hits = False, hits + 1
    return 1.0 if not wanted + found else 2 * hits / (wanted + found)


def _xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    return np.concatenate([xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2], -1)


def yolov8_scores(output: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes [N, A, 4] xyxy, best class score [N, A], best class [N, A]) of a YOLOv8 head [N, 4+C, A]."""
    rows = output.transpose(0, 2, 1)
    return _xywh_to_xyxy(rows[..., :4]), rows[..., 4:].max(-1), rows[..., 4:].argmax(-1)


def yolox_scores(output: np.ndarray, size: int, strides=(8, 16, 32)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same for a YOLOX head [N, A, 5+C] on ``size``x``size`` inputs: grid offsets and log sizes
    decoded per stride, score = objectness x class score."""
    grids, steps = [], []
    for stride in strides:
        yy, xx = np.mgrid[0:size // stride, 0:size // stride]
        grids.append(np.stack([xx.ravel(), yy.ravel()], -1))
        steps.append(np.full((grids[-1].shape[0], 1), stride))
    grid, step = np.concatenate(grids), np.concatenate(steps)
    centre, extent = (output[..., :2] + grid) * step, np.exp(np.minimum(output[..., 2:4], 30)) * step
    scores = output[..., 4:5] * output[..., 5:]
    return _xywh_to_xyxy(np.concatenate([centre, extent], -1)), scores.max(-1), scores.argmax(-1)


def detections(scored: tuple[np.ndarray, np.ndarray, np.ndarray], score: float,
               overlap: float) -> list[Detections]:
    """Per image: the boxes whose score reaches ``score`` after NMS at ``overlap``, best first."""
    out = []
    for boxes, best, cls in zip(*scored):
        pick = np.flatnonzero(best >= score)
        kept = pick[nms(boxes[pick], best[pick], overlap)] if pick.size else pick
        out.append((boxes[kept], cls[kept]))
    return out


def anchor_decisions(scored: tuple[np.ndarray, np.ndarray, np.ndarray], score: float) -> np.ndarray:
    """[N, A] per anchor: its best class where the score reaches ``score``, else -1."""
    _, best, cls = scored
    return np.where(best >= score, cls, -1)
