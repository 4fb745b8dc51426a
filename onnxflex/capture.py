"""Capture: run the FP32 model in onnxruntime with block boundary tensors as extra outputs, batch by
batch, into the TensorCache (cache.py) as the FP run."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import onnx

from onnxflex.cache import Key, TensorCache, batch_within
from onnxflex.calib import CalibrationSet, fixed_batch
from onnxflex.layout import Layout
from onnxflex.ort import session, session_options
from onnxflex.probes import tensor_layout, with_probes


CAPTURE_BATCH = 64  # samples per onnxruntime run of the probed model, at most


def capture_batch(per_sample: int, max_bytes: int) -> int:
    """Samples per capture run: CAPTURE_BATCH, or fewer when one run's probed outputs, with the act
    points' values of the run before that the observers still read (``per_sample`` bytes a sample in all),
    would pass a quarter of the cache's RAM bound ``max_bytes``: onnxruntime returns a run's outputs all
    at once, beside what the cache already holds (a 736x736 detector's boundaries over 32 samples are 6 GB)."""
    return batch_within(CAPTURE_BATCH, per_sample, max_bytes)


def capture(model: onnx.ModelProto, tensors: list[str], data: CalibrationSet, cache: TensorCache,
            providers: list[str], batch: int = CAPTURE_BATCH, progress=None, observers=None,
            rows: dict[str, int] | None = None) -> None:
    """Run ``model`` over ``data`` and store each tensor in ``cache`` as its FP run (``Key.fp(name)``),
    samples on dim 0 (a shared tensor once), of a tensor in ``rows`` its first that many samples only;
    records each tensor's batch axis in ``cache.layout``.
    ``observers`` (rounding/actcapture.CaptureObservers, or None) also gets each batch's values of its
    ``tensors`` (act points, outputs of the same run), which the cache does not store."""
    observed = list(observers.tensors) if observers is not None else []
    probed, probes = with_probes(model, list(dict.fromkeys(tensors + observed)))
    # its threads sleep between runs instead of spinning: the observers' thread needs the cores then
    sess = session(probed, providers, opts=session_options(spinning=observers is None))
    fixed = fixed_batch(model)
    names = list(probes)
    stored = set(tensors)
    # an observed act point may fold the samples into another axis (a Reshape to [N*6, 4]): its range
    # does not need them, so it counts as shared; a stored tensor must carry them
    layout = tensor_layout(sess, names, data, fixed, folded_as_shared={n for n in names if n not in stored})
    cache.record(Layout({k: v for k, v in layout.axes.items() if k in stored}), data.num_samples)
    n, start = data.num_samples, 0
    # a graph input's value is its feed: onnxruntime is not asked to copy it out, and one that carries
    # its samples on dim 0 is kept as the calibration array itself (no fresh memory written)
    fed = {probes[o] for o in names} & set(data.arrays)
    fetched = [o for o in names if probes[o] not in fed]
    held = {name for name in fed & stored if layout.axis(name) == 0 and not layout.shared(name)
            and cache.hold(Key.fp(name), data.arrays[name][:n if rows is None else rows.get(name, n)])}
    # the observers take a batch's values in a thread of their own while onnxruntime runs the next batch
    # (both let go of the GIL in their array work), one batch at a time and in order
    with ThreadPoolExecutor(1, thread_name_prefix="onnxflex-observe") as beside:
        observing = None
        for feeds in data.batches(fixed or batch):
            outputs = sess.run(fetched, feeds) if fetched else []  # no names would fetch every output
            values = {probes[out_name]: value for out_name, value in zip(fetched, outputs)}
            values.update({name: feeds[name] for name in fed})
            if observing is not None:
                observing.result()
            if observers is not None:
                observing = beside.submit(observers.observe, {k: values[k] for k in observed}, layout, n)
            for name in (t for t in tensors if t not in held):
                limit = n if rows is None else rows.get(name, n)
                value = layout.to_samples(name, values[name])
                if layout.shared(name) or limit == n:
                    cache.write(Key.fp(name), start, value)
                elif start < limit:
                    cache.write(Key.fp(name), start, value[:limit - start], total=limit)
            del values, outputs
            start += min(fixed or batch, n - start)
            if progress is not None:
                progress(start, n)
        if observing is not None:
            observing.result()
