"""The pretrained models of bench/real_models.py: which wheel ships each (pinned), where the .onnx lies
in it, how its data is made (bench/real_data.py), how it is run and scored (bench/real_metrics.py).

A task (built on the folder its wheel unpacked into) gives: ``samples(n, seed)`` → a Samples (the model's feeds, samples on each input's
batch axis, and what the metric needs); ``run(path, samples)`` → the outputs it scores (for the VAD a
whole streamed sequence); ``metric(outputs, fp32_outputs, samples)`` → named figures (against the
rendered truth where there is one, else against FP32); ``decisions(outputs)`` → one integer per item
(an argmax, a thresholded pixel or anchor, a speech frame) for the agreement with FP32 and the paired test.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import real_data as data
import real_metrics as metrics

THREADS = 2  # onnxruntime threads when scoring (latency has its own count in real_models.py)


@dataclass
class Samples:
    feeds: dict[str, np.ndarray]
    truth: list = field(default_factory=list)
    chunks: np.ndarray | None = None  # the VAD's [calls, streams, 576] stream


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_batches(path: Path, feeds: dict[str, np.ndarray], batch: int, out_axis: int = 0) -> np.ndarray:
    """The first output over all samples (axis 0 of every feed), ``batch`` at a time, joined on ``out_axis``."""
    sess, n = session(path), len(next(iter(feeds.values())))
    return np.concatenate([sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0]
                           for i in range(0, n, batch)], axis=out_axis)


class Task:
    name = kind = wheel = member = ""
    batch = 16  # onnxruntime batch when scoring and calibrating onnxruntime (1 where the model fixes it)
    timing_batch = 8
    fix_inputs: tuple[str, ...] = ()
    batch_axes: tuple[str, ...] = ()

    def __init__(self, folder: Path) -> None:
        self.folder = folder  # the unpacked wheel

    @property
    def path(self) -> Path:
        return self.folder / self.member

    def run(self, path: Path, samples: Samples) -> np.ndarray:
        return run_batches(path, samples.feeds, self.batch)


class TextRecognizer(Task):
    """A CTC text recogniser on rendered lines: line and character accuracy of the greedy decode."""

    time_major = False

    def charset(self) -> list[str]:
        raise NotImplementedError

    def line(self, rng: np.random.Generator) -> tuple[str, np.ndarray]:
        raise NotImplementedError

    def samples(self, n: int, seed: int) -> Samples:
        rng = np.random.default_rng(seed)
        lines = [self.line(rng) for _ in range(n)]
        return Samples({"x": np.stack([x for _, x in lines])}, [t for t, _ in lines])

    def run(self, path: Path, samples: Samples) -> np.ndarray:
        out = run_batches(path, samples.feeds, self.batch, 1 if self.time_major else 0)
        return out.transpose(1, 0, 2) if self.time_major else out

    def metric(self, outputs, fp32, samples: Samples) -> dict[str, float]:
        line, char = metrics.text_accuracy(metrics.decode(outputs, self.charset()), samples.truth)
        return {"line": line, "char": char}

    def decisions(self, outputs: np.ndarray) -> np.ndarray:
        return outputs.argmax(-1).ravel()


class PaddleRecognizer(TextRecognizer):
    name, kind = "ppocr_rec", "PP-OCRv4 text recogniser (CTC, 6,625 classes)"
    wheel, member = "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"

    def charset(self) -> list[str]:
        """blank, the model's own dictionary (its metadata "character"), then the space, as rapidocr reads it."""
        meta = session(self.path).get_modelmeta().custom_metadata_map
        return ["", *meta["character"].splitlines(), " "]

    def line(self, rng):
        text, height = data.random_text(rng), int(rng.integers(32, 80))
        rgb = data.render_line(text, height, data.line_width(text, height, rng, 320 / 48), rng)
        return text, data.ppocr_line_input(rgb[..., ::-1], 48, 320)


class DdddRecognizer(TextRecognizer):
    name, kind = "ddddocr_ocr", "ddddocr captcha recogniser (CTC, 8,210 classes, batch 1)"
    wheel, member = "ddddocr==1.6.1", "ddddocr/common.onnx"
    batch, timing_batch, time_major = 1, 1, True

    def charset(self) -> list[str]:
        """The package's CHARSET_BETA (the charset of common.onnx), read from its source, not imported."""
        tree = ast.parse((self.folder / "ddddocr" / "charsets.py").read_text(encoding="utf-8"))
        return next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                    and getattr(node.targets[0], "id", "") == "CHARSET_BETA")

    def samples(self, n: int, seed: int) -> Samples:
        got = super().samples(n, seed)
        return Samples({"input1": got.feeds["x"]}, got.truth)

    def line(self, rng):
        text, height = data.captcha_text(rng), int(rng.integers(40, 96))
        return text, data.ddddocr_ocr_input(data.render_line(text, height, 4 * height, rng))


class DirectionClassifier(Task):
    name, kind = "ppocr_cls", "PP-OCR text direction classifier (0/180)"
    wheel, member = "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
    batch, timing_batch = 32, 32

    def samples(self, n: int, seed: int) -> Samples:
        rng = np.random.default_rng(seed)
        images, labels = [], []
        for _ in range(n):
            text, height = data.random_text(rng), int(rng.integers(32, 80))
            rgb = data.render_line(text, height, data.line_width(text, height, rng, 192 / 48), rng)
            labels.append(int(rng.integers(2)))
            images.append(data.ppocr_line_input((rgb[::-1, ::-1] if labels[-1] else rgb)[..., ::-1], 48, 192))
        return Samples({"x": np.stack(images)}, labels)

    def metric(self, outputs, fp32, samples):
        return {"accuracy": float((outputs.argmax(-1) == np.array(samples.truth)).mean())}

    def decisions(self, outputs):
        return outputs.argmax(-1).ravel()


class DbDetector(Task):
    name, kind = "ppocr_det", "PP-OCRv4 text detector (DB segmentation, 736x736)"
    wheel, member = "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
    batch, timing_batch, side, threshold, grid = 4, 1, 736, 0.3, 8

    def samples(self, n: int, seed: int) -> Samples:
        rng = np.random.default_rng(seed)
        scenes = [data.text_scene(self.side, self.side, rng)[..., ::-1] for _ in range(n)]
        return Samples({"x": np.stack([data.ppocr_det_input(s, self.side) for s in scenes])})

    def metric(self, outputs, fp32, samples):
        return {"mask IoU vs FP32": metrics.mask_iou(fp32 > self.threshold, outputs > self.threshold)}

    def decisions(self, outputs):
        """The text mask (rapidocr's threshold 0.3) on every 8th pixel of each axis."""
        return (outputs[:, 0, ::self.grid, ::self.grid] > self.threshold).ravel().astype(np.int64)


class BoxDetector(Task):
    """Boxes after the package's score threshold and NMS: F1 against FP32's boxes at IoU 0.5."""

    score = overlap = 0.0

    def scored(self, outputs):
        raise NotImplementedError

    def metric(self, outputs, fp32, samples):
        ref = metrics.detections(self.scored(fp32), self.score, self.overlap)
        got = metrics.detections(self.scored(outputs), self.score, self.overlap)
        return {"box F1 vs FP32": metrics.detection_f1(ref, got), "FP32 boxes": sum(len(b) for b, _ in ref)}

    def decisions(self, outputs):
        return metrics.anchor_decisions(self.scored(outputs), self.score).ravel()


class DdddDetector(BoxDetector):
    name, kind = "ddddocr_det", "ddddocr character detector (YOLOX, 416x416, batch 1)"
    wheel, member = "ddddocr==1.6.1", "ddddocr/common_det.onnx"
    batch, timing_batch, score, overlap, side = 1, 1, 0.1, 0.45, 416

    def samples(self, n: int, seed: int) -> Samples:
        rng = np.random.default_rng(seed)
        return Samples({"images": np.stack([data.ddddocr_det_input(data.text_scene(self.side, self.side, rng)[..., ::-1])
                                            for _ in range(n)])})

    def scored(self, outputs):
        return metrics.yolox_scores(outputs, self.side)


class NudeDetector(BoxDetector):
    name, kind = "nudenet", "NudeNet 320n body-part detector (YOLOv8n, 18 classes)"
    wheel, member = "nudenet==3.4.2", "nudenet/320n.onnx"
    batch, timing_batch, score, overlap, side = 16, 8, 0.25, 0.45, 320

    def samples(self, n: int, seed: int) -> Samples:
        rng = np.random.default_rng(seed)
        return Samples({"images": np.stack([data.nudenet_input(data.figure_scene(self.side, self.side, rng))
                                            for _ in range(n)])})

    def scored(self, outputs):
        return metrics.yolov8_scores(outputs)


class VoiceActivity(Task):
    """Silero VAD streamed call after call: its speech decisions (p > 0.5) and output over the sequence."""

    name, kind = "silero_vad", "Silero VAD v6 (LSTM, streamed state, If on sr)"
    wheel, member = "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx"
    batch, timing_batch, streams, threshold = 64, 32, 4, 0.5
    fix_inputs, batch_axes = ("sr=16000",), ("state=1",)

    def samples(self, n: int, seed: int) -> Samples:
        """``n`` chunks, from 4 streams of at least 16 calls; the states those of the FP32 model streamed."""
        rng = np.random.default_rng(seed)
        chunks = data.vad_chunks(self.streams, max(16, math.ceil(n / self.streams)), rng)
        _, states = self.stream(self.path, chunks)
        feeds = {"input": chunks.reshape(-1, chunks.shape[-1])[:n],
                 "state": np.concatenate(states, axis=1)[:, :n]}
        return Samples(feeds, chunks=chunks)

    @staticmethod
    def stream(path: Path, chunks: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(outputs [calls, streams, 1], the state fed to each call) with the state fed back."""
        sess = session(path)
        state, outputs, states = np.zeros((2, chunks.shape[1], 128), np.float32), [], []
        for chunk in chunks:
            states.append(state)
            out, state = sess.run(["output", "stateN"], {"input": chunk, "state": state, "sr": np.array(16000)})
            outputs.append(out)
        return np.stack(outputs), states

    def run(self, path: Path, samples: Samples) -> np.ndarray:
        return self.stream(path, samples.chunks)[0]

    def metric(self, outputs, fp32, samples):
        from onnxflex.qparams import sqnr_db

        agree = float(((outputs > self.threshold) == (fp32 > self.threshold)).mean())
        return {"frame agreement": agree, "streamed SQNR dB": sqnr_db(fp32, outputs)}

    def decisions(self, outputs):
        return (outputs > self.threshold).ravel().astype(np.int64)


TASKS = {t.name: t for t in (PaddleRecognizer, DirectionClassifier, DbDetector, DdddRecognizer, DdddDetector,
                              NudeDetector, VoiceActivity)}
