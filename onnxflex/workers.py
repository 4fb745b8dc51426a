"""Block reconstruction as independent jobs (``block_input`` fp), run in this process or spread over
workers (``workers`` > 1: local processes; ``ray_address``: Ray tasks); with quantized block input,
the next blocks' rounders built in the workers.

With ``block_input`` fp a block learns on its captured FP inputs against its FP outputs. What else it
reads of other blocks is the activation step of an input another block quantizes (its layers' int32
biases are quantized with it, and their weight steps made room for them): in fp mode that is the step
as calibrated (``calibrated_acts``, one FP pass per block before any block learns), never as another
block learned it. So each block is a job (``learn_block``) that needs nothing another job computes; a
worker runs it with the seed the block gets in any run (config.seed × 1000 + its index) and returns
the block's learned state in the form a checkpoint keeps it. The parent applies the states in plan
order through BlockRunner.resume, which rebuilds the frozen block (its quantized outputs are not
stored: no block reads them in fp mode): every worker count writes the same bytes. A block whose
quantizer or weight another block shares (a Concat tie on TensorRT, a weight two blocks read) runs in
the parent, in order.

With the quantized block input (the default) block k+1 learns on block k's quantized outputs, so the
blocks learn here, in order; with workers a PipelinedRunner has them build the next blocks' rounders
(``build_rounders``: the step searches, HQQ's fit) while a block learns. Same bytes as one process on
the CPU (a worker builds on the CPU; on a GPU the main process would search there).

A worker that dies (killed, out of memory) has its job run again in a fresh worker, RETRIES times at
most; an exception a job raises reaches the caller as itself (the same class, so the same exit code).
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import pickle
import tempfile
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onnxflex.blocks import BlockPlan
from onnxflex.cache import DiskArray
from onnxflex.device import cpu_budget
from onnxflex.errors import ClusterError
from onnxflex.layout import Layout
from onnxflex.passes.select import concat_ties
from onnxflex.progress import Progress

log = logging.getLogger("onnxflex")

RETRIES = 3  # fresh workers a job gets after the one running it died
KILL_HOOK = "ONNXFLEX_TEST_KILL_WORKER"  # test hook: a block index whose first worker exits at once (tests only)


@dataclass(frozen=True)
class Context:
    """What every job of one reconstruction reads: the plan, target, options, device, step budget, and
    the cache's layout (``axes``: Layout.axes as a dict), sample count and RAM bound."""

    plan: BlockPlan
    target: Any
    config: Any
    device: str
    providers: tuple[str, ...]
    budget: Any
    axes: dict
    num_samples: int
    max_bytes: int


@dataclass(frozen=True)
class Spilled:
    """A spilled cache entry as a job carries it: its file, reopened in the worker (cache.DiskArray)."""

    path: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Job:
    """Block ``index``'s FP inputs and outputs by tensor name (arrays, or Spilled files), its act ranges
    from the capture run (``observed``, None: calibrated in the block) and the test hook's marker file
    (``kill_marker``: the worker exits at once unless it exists, creating it), and the calibrated state
    (checkpoint.act_states form) of the act points its layers read that other blocks quantize
    (``foreign``)."""

    index: int
    arrays: dict[str, np.ndarray | Spilled]
    observed: Any = None
    kill_marker: str = ""
    foreign: dict = dataclasses.field(default_factory=dict)


class JobCache:
    """The TensorCache reads a BlockRunner makes for one block in fp mode: its FP entries. The quantized
    outputs it writes are dropped (the parent stores them when it applies the block)."""

    def __init__(self, context: Context, job: Job) -> None:
        self.layout = Layout(context.axes)
        self.num_samples, self.max_bytes = context.num_samples, context.max_bytes
        self.arrays = {name: _reopened(a) if isinstance(a, Spilled) else a for name, a in job.arrays.items()}

    def fp_inputs(self, block) -> dict:
        return {name: self.arrays[name] for name in block.inputs}

    def fp_outputs(self, block) -> dict:
        return {name: self.arrays[name] for name in block.outputs}

    def write(self, key, start: int, rows: np.ndarray, total: int | None = None) -> None:
        pass

    def close(self) -> None:
        for array in self.arrays.values():
            if isinstance(array, DiskArray):
                array.close()


def _reopened(entry: Spilled) -> DiskArray:
    """The spilled entry's file, opened here; an error when this machine does not have it (DiskArray
    would create it, and the block would learn on zeros)."""
    if not Path(entry.path).is_file():
        raise FileNotFoundError(f"the spilled cache entry {entry.path} is not on this worker's disk: a Ray cluster "
                                "must see the spill folder ($TMPDIR) of the machine running onnxflex, or raise "
                                "--max-cache-mb so that nothing spills")
    return DiskArray(Path(entry.path), entry.shape, entry.dtype)


class Observed:
    """One block's capture-run act ranges behind CaptureObservers' ``of``."""

    def __init__(self, values) -> None:
        self.values = values

    def of(self, index: int):
        return self.values


class Records(logging.Handler):
    """Keeps the log records emitted in a worker (message formatted), for the parent to emit in block
    order (``relay``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args, record.exc_info = record.getMessage(), None, None
        self.records.append(record)


def captured(level: int, fn: Callable, context, job) -> tuple[Any, list[logging.LogRecord]]:
    """In a worker process: ``fn(context, job)`` with onnxflex's log at ``level`` (the parent's), and
    the records it emitted, kept here instead of printed."""
    records = Records()
    log.addHandler(records)
    log.setLevel(level)
    log.propagate = False
    try:
        return fn(context, job), records.records
    finally:
        log.removeHandler(records)


def relay(records: list[logging.LogRecord]) -> None:
    """Emits a worker's log records here, as far as this process's log level lets them through."""
    for record in records:
        if log.isEnabledFor(record.levelno):
            log.handle(record)


def learn_block(context: Context, job: Job) -> dict:
    """Block ``job.index`` built, learned and frozen (BlockRunner.quantize) on its FP tensors, in a
    worker or here. Returns its state as Checkpoint.load does (block, result, weights, acts, biases)."""
    import torch

    from onnxflex.checkpoint import act_states
    from onnxflex.extdata import is_offloaded
    from onnxflex.rounding.heap import reused_pages, small_pages
    from onnxflex.rounding.reconstruct import BlockRunner, finished_state
    from onnxflex.rounding.torchify import QuantState

    _exit_if_marked(job)
    block = context.plan.blocks[job.index]
    cache = JobCache(context, job)
    try:
        device = torch.device(context.device)
        state = QuantState(acts=load_acts(job.foreign, context.config.abits, context.target, device))
        runner = BlockRunner(context.plan, cache, state, context.target, context.config, device,
                             context.providers, context.budget,
                             None if job.observed is None else Observed(job.observed))
        # as reconstruct's block loop does, and the pipeline around it (small_pages)
        with reused_pages(bounded=is_offloaded(context.plan.model)), small_pages():
            _, result = runner.quantize(job.index, block, Progress(enabled=False))
        weights, acts, biases = finished_state(runner.state, block)
    finally:
        cache.close()
    return {"block": block.name, "result": dataclasses.asdict(result), "weights": weights,
            "acts": act_states(acts), "biases": {k: v.detach().cpu() for k, v in biases.items()}}


def _exit_if_marked(job: Job) -> None:
    """The test hook: a job with a kill marker that does not exist yet makes it and ends this worker."""
    if job.kill_marker and not os.path.exists(job.kill_marker):
        Path(job.kill_marker).touch()
        os._exit(1)


def build_rounders(context: Context, job: Job) -> dict:
    """Block ``job.index``'s rounders (reconstruct.block_rounders), built from its weights alone, in a
    worker or here: what PipelinedRunner runs ahead of the block that learns."""
    from onnxflex.rounding.reconstruct import block_rounders

    _exit_if_marked(job)
    return block_rounders(context.plan.blocks[job.index], context.plan.model, context.config)


def load_acts(states: dict, bits: int, target, device) -> dict:
    """ActQuantizers rebuilt from their checkpoint.act_states form."""
    from onnxflex.rounding.activation import ActQuantizer

    acts = {}
    for name, saved in states.items():
        act = acts[name] = ActQuantizer(bits, target.act_symmetric).to(device)
        act.load_state_dict(saved["state"])
        act.enabled = saved["enabled"]
    return acts


def calibrated_acts(runner) -> dict[str, dict]:
    """Every act point's quantizer as its block calibrates it before learning (BlockRunner.build in plan
    order on a fresh QuantState, so that a block's start sees the earlier blocks' calibrated steps), in
    checkpoint.act_states form. ``runner`` and its state are left as they are."""
    from onnxflex.checkpoint import act_states
    from onnxflex.rounding.reconstruct import BlockRunner
    from onnxflex.rounding.torchify import QuantState

    fresh = BlockRunner(runner.plan, runner.cache, QuantState(), runner.target, runner.config, runner.device,
                        runner.providers, runner.budget, runner.observers)
    for index, block in enumerate(runner.plan.blocks):
        with fresh.loaded(block) as data:
            fresh.build(index, block, data, runner.config.seed * 1000 + index)
    return act_states(fresh.state.acts)


_WORKER_CONTEXT: dict = {}  # in a LocalPool worker process: the path of the run's pickled Context, then it


def _start_worker(threads: int, level: int, path: str) -> None:
    _set_threads(threads)
    _WORKER_CONTEXT.update(level=level, path=path)


def _local_call(fn: Callable, job):
    if "context" not in _WORKER_CONTEXT:
        _WORKER_CONTEXT["context"] = pickle.loads(Path(_WORKER_CONTEXT["path"]).read_bytes())
    return captured(_WORKER_CONTEXT["level"], fn, _WORKER_CONTEXT["context"], job)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _ray_call(threads: int, level: int, fn: Callable, context, job):
    _set_threads(threads)
    return captured(level, fn, context, job)


class InProcessPool:
    """Runs each job here, when its result is asked for (one worker)."""

    isolated = False

    def __init__(self, context) -> None:
        self.context, self.calls = context, {}

    def submit(self, key: int, fn: Callable, job) -> None:
        self.calls[key] = (fn, job)

    def result(self, key: int):
        fn, job = self.calls.pop(key)
        return fn(self.context, job)

    def close(self, abort: bool = False) -> None:
        self.calls.clear()


class LocalPool:
    """``workers`` spawned processes, each with ``threads`` torch threads and ``context`` (read from a
    file once); ``fn(context, job)`` per job. A worker that dies breaks the process pool: a fresh pool
    runs every job not finished yet."""

    isolated = True

    def __init__(self, workers: int, threads: int, context) -> None:
        self.workers, self.threads = workers, threads
        # a file, not the start arguments: those are written to a starting worker's pipe, which blocks
        # the parent until the worker has imported onnxflex (seconds per worker)
        self.folder = tempfile.TemporaryDirectory(prefix="onnxflex-workers-")
        self.context = str(Path(self.folder.name) / "context.pickle")
        Path(self.context).write_bytes(pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL))
        self.calls: dict[int, tuple[Callable, Any]] = {}
        self.futures: dict[int, Future] = {}
        self.deaths: dict[int, int] = {}
        self.executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker,
                                   initargs=(self.threads, log.getEffectiveLevel(), self.context))

    def submit(self, key: int, fn: Callable, job) -> None:
        self.calls[key] = (fn, job)
        self.futures[key] = self.executor.submit(_local_call, fn, job)

    def result(self, key: int):
        """Job ``key``'s return value, or its exception raised here."""
        while True:
            try:
                value = self.futures[key].result()
            except BrokenProcessPool:
                self._restart(key)
                continue
            del self.calls[key], self.futures[key]
            relay(value[1])
            return value[0]

    def _restart(self, key: int) -> None:
        self.deaths[key] = self.deaths.get(key, 0) + 1
        if self.deaths[key] > RETRIES:
            raise RuntimeError(f"job {key}: its worker died {self.deaths[key]} times (out of memory?); "
                               "run with fewer --workers")
        self.executor.shutdown(wait=True, cancel_futures=True)
        broken = [k for k, f in self.futures.items()
                  if f.cancelled() or isinstance(f.exception(), BrokenProcessPool)]
        log.warning("a worker process died; job(s) %s run again in fresh workers", ", ".join(map(str, broken)))
        self.executor = self._start()
        for k in broken:
            self.futures[k] = self.executor.submit(_local_call, *self.calls[k])

    def close(self, abort: bool = False) -> None:
        """Stops the workers once their running jobs end; with ``abort`` (an interrupted or failed run)
        at once."""
        if abort:
            for process in list(self.executor._processes.values()):  # no public way before Python 3.14
                process.terminate()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.folder.cleanup()


class RayPool:
    """Ray tasks on the cluster at ``address`` ('local': a Ray instance on this machine with ``workers``
    CPUs, unless this process has one running already), each with ``threads`` torch threads; Ray runs
    a task whose worker died again (``max_retries``)."""

    isolated = True

    def __init__(self, address: str, workers: int, threads: int, context) -> None:
        import ray  # QuantConfig refused a ray_address without it

        self.ray, self.threads = ray, threads
        self.started = not ray.is_initialized()
        if self.started:
            where = {"num_cpus": workers} if address == "local" else {"address": address}
            try:
                ray.init(include_dashboard=False, **where)
            except ConnectionError as exc:
                raise ClusterError(_unreachable(address, exc)) from exc
        self.context = ray.put(context)
        self.remote = ray.remote(num_cpus=1, max_retries=RETRIES)(_ray_call)
        self.refs: dict[int, Any] = {}

    def submit(self, key: int, fn: Callable, job) -> None:
        self.refs[key] = self.remote.remote(self.threads, log.getEffectiveLevel(), fn, self.context, job)

    def result(self, key: int):
        """Job ``key``'s return value, or its exception (the task's own, not Ray's wrapper) raised here."""
        try:
            value, records = self.ray.get(self.refs.pop(key))
        except self.ray.exceptions.RayTaskError as exc:
            raise exc.cause from None
        relay(records)
        return value

    def close(self, abort: bool = False) -> None:
        for ref in self.refs.values():
            self.ray.cancel(ref, force=True)
        self.refs.clear()
        if self.started:
            self.ray.shutdown()


def _unreachable(address: str, exc: ConnectionError) -> str:
    """What to tell a user whose cluster did not take this process's connection."""
    why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if address.startswith("ray://"):
        fix = "check that the cluster runs a Ray Client server at that port (ray start --head " \
              "--ray-client-server-port, 10001 by default)"
    else:
        fix = "check that the cluster runs and that the address is its head node's (host:port, or 'auto' on a node)"
    if os.environ.get("RAY_AUTH_MODE") != "token":
        fix += ("; a cluster started with token authentication (ray start says so) also needs RAY_AUTH_MODE=token "
                "in this process's environment, its token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
    return f"--ray-address {address}: {why}; {fix}"


def open_pool(config, context):
    """The pool ``config`` asks for (RayPool with ``ray_address``, else LocalPool with workers > 1, else
    InProcessPool), each worker with max(1, CPUs // workers) torch threads."""
    if config.workers == 1 and not config.ray_address:
        return InProcessPool(context)
    threads = max(1, cpu_budget() // config.workers)
    if config.ray_address:
        return RayPool(config.ray_address, config.workers, threads, context)
    return LocalPool(config.workers, threads, context)


def shared_blocks(plan: BlockPlan, target) -> set[int]:
    """The indices of the blocks that share a quantizer (a Concat tie, where the target ties scales)
    or a weight with another block: they run in the parent, in plan order."""
    ties = concat_ties(plan.model) if target.shared_concat_scales else {}
    owners: dict[tuple[str, Any], set[int]] = {}
    for index, block in enumerate(plan.blocks):
        for point in block.all_points:
            if point in ties:
                owners.setdefault(("tie", ties[point]), set()).add(index)
        for layer in block.layers:
            owners.setdefault(("weight", layer.weight), set()).add(index)
    return {i for indices in owners.values() if len(indices) > 1 for i in indices}


class PoolRunner:
    """What both runners over a pool share: the test hook's marker files (``marker``), removed by
    ``close``."""

    pool: Any
    markers: list[Path]

    def marker(self, index: int) -> str:
        """The test hook's marker file for block ``index`` when KILL_HOOK names it and the pool's workers
        are processes (kept in ``markers``, to be removed), else ''."""
        if not self.pool.isolated or os.environ.get(KILL_HOOK) != str(index):
            return ""
        path = Path(tempfile.gettempdir()) / f"onnxflex-test-kill-{os.getpid()}-{index}"
        self.markers.append(path)
        return str(path)

    def close(self) -> None:
        for path in self.markers:
            path.unlink(missing_ok=True)


class ParallelRunner(PoolRunner):
    """A BlockRunner whose independent blocks learn as jobs in ``pool``, at most ``ahead`` submitted
    beyond the block being applied (each job holds its block's FP tensors); ``run`` applies them in plan
    order. With ``checkpoint`` a block saved there is restored, not submitted, and each applied block
    is saved."""

    def __init__(self, runner, pool, ahead: int, checkpoint=None) -> None:
        self.runner, self.pool, self.ahead, self.checkpoint = runner, pool, ahead, checkpoint
        shared = shared_blocks(runner.plan, runner.target)
        blocks = runner.plan.blocks
        saved = {i for i, b in enumerate(blocks) if checkpoint is not None and checkpoint.path(i).is_file()}
        self.queue = [i for i in range(len(blocks)) if i not in shared and i not in saved]
        self.calibrated = calibrated_acts(runner) if self.queue else {}
        self.jobs = set(self.queue)
        self.submitted: list[int] = []
        self.markers: list[Path] = []
        self._top_up()

    def _job(self, index: int) -> Job:
        block, cache = self.runner.plan.blocks[index], self.runner.cache
        arrays = {**cache.fp_inputs(block), **cache.fp_outputs(block)}
        arrays = {name: Spilled(str(a.path), a.shape, a.dtype.str) if isinstance(a, DiskArray) else a
                  for name, a in arrays.items()}
        observers = self.runner.observers
        marker = self.marker(index)
        own = set(block.all_points)
        foreign = {l.input: self.calibrated[l.input] for l in block.layers
                   if l.input not in own and l.input in self.calibrated}
        return Job(index, arrays, None if observers is None else observers.of(index), marker, foreign)

    def _top_up(self) -> None:
        while self.queue and len(self.submitted) < self.ahead:
            index = self.queue.pop(0)
            self.pool.submit(index, learn_block, self._job(index))
            self.submitted.append(index)

    def run(self, index: int, block, progress: Progress):
        """Block ``index`` applied from its worker's state (or, a shared block, run here); its progress
        line and its worker's log lines emitted."""
        from onnxflex.rounding.reconstruct import BlockResult, finished_state

        if index not in self.jobs:
            return self._in_order(index, block, progress)
        saved = self.pool.result(index)
        self.submitted.remove(index)
        self._top_up()
        module = self.runner.resume(index, block, saved, store=False)  # fp mode: no block reads q: rows
        result = BlockResult(**saved["result"])
        if self.checkpoint is not None:
            self.checkpoint.save(index, block.name, result, *finished_state(self.runner.state, block))
        progress.finish(self.runner.summary(index, result), result.seconds)  # the job's own time
        return module, result

    def _in_order(self, index: int, block, progress: Progress):
        """A block restored from the checkpoint, or (a shared block) run here."""
        from onnxflex.rounding.reconstruct import CheckpointedRunner

        if self.checkpoint is not None:
            return CheckpointedRunner(self.runner, self.checkpoint).run(index, block, progress)
        return self.runner.run(index, block, progress)


class PipelinedRunner(PoolRunner):
    """The block loop with quantized block input over ``pool``: each block learns here, in plan order, on
    the quantized outputs of the blocks before it (the FP tensors of every block were captured in one
    pass before the loop), while the workers build the rounders of the next ``ahead`` blocks
    (build_rounders: the step searches and HQQ's fit, which read only the weights). A block saved in
    ``checkpoint`` is restored and gets no job."""

    def __init__(self, runner, pool, ahead: int, checkpoint=None) -> None:
        from onnxflex.rounding.reconstruct import CheckpointedRunner

        self.runner, self.pool, self.ahead = runner, pool, ahead
        self.inner = runner if checkpoint is None else CheckpointedRunner(runner, checkpoint)
        blocks = runner.plan.blocks
        # the first block to learn builds its own: the workers are still starting (seconds) then
        self.queue = [i for i, b in enumerate(blocks) if not b.unsupported and b.layers
                      and (checkpoint is None or not checkpoint.path(i).is_file())][1:]
        self.submitted: list[int] = []
        self.markers: list[Path] = []
        self._top_up()

    def _top_up(self) -> None:
        while self.queue and len(self.submitted) < self.ahead:
            index = self.queue.pop(0)
            self.pool.submit(index, build_rounders, Job(index, {}, kill_marker=self.marker(index)))
            self.submitted.append(index)

    def run(self, index: int, block, progress: Progress):
        """Block ``index`` built with the rounders its worker made, learned, frozen and stored here."""
        if index in self.submitted:
            self.runner.ready.update(self.pool.result(index))
            self.submitted.remove(index)
        self._top_up()
        return self.inner.run(index, block, progress)


@contextmanager
def spread(runner, checkpoint=None):
    """The block loop's runner: in fp mode (``block_input`` fp) a ParallelRunner over the pool the config
    names (one worker: this process); with quantized block input and workers (more than one, or Ray) a
    PipelinedRunner; each closed (its workers stopped) on leaving. Else ``runner`` itself, behind
    ``checkpoint`` when one is given (reconstruct.CheckpointedRunner)."""
    from onnxflex.rounding.reconstruct import checkpointed

    config = runner.config
    fp = config.block_input == "fp"
    if not fp and config.workers == 1 and not config.ray_address:
        with checkpointed(runner, checkpoint) as plain:
            yield plain
        return
    cache = runner.cache
    context = Context(runner.plan, runner.target, config, runner.device.type, tuple(runner.providers),
                      runner.budget, dict(cache.layout.axes), cache.num_samples, cache.max_bytes)
    pool = open_pool(config, context)
    parallel = None
    try:
        parallel = ParallelRunner(runner, pool, config.workers + 1, checkpoint) if fp else \
            PipelinedRunner(runner, pool, config.workers, checkpoint)
        yield parallel
    except BaseException:  # interrupted (SIGINT, SIGTERM) or failed: the workers' jobs are not waited for
        pool.close(abort=True)
        raise
    else:
        pool.close()
    finally:
        if parallel is not None:
            parallel.close()
