"""Loop speed-ups that must not change a bit: the fused HardSwish chain (outputs and gradients equal to
the unfused interpreter steps', exactly), the activation fake quantizer's one-comparison mask (equal to
the earlier five-op form), the one-pass clamp gradient (equal to torch's), and the heap context (sets
glibc's thresholds and resets them)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnxflex
from onnxflex.graph import default_opset
from onnxflex.options import resolve
from onnxflex.pipeline import build_plan
from onnxflex.rounding import heap
from onnxflex.rounding.activation import ActQuantizer
from onnxflex.rounding.quant import _FakeQuant, _integers
from onnxflex.rounding.reconstruct import add_block_quantizers
from onnxflex.rounding.torchify import BlockModule, QuantState
from onnxflex.runtimes.targets import get_target


def _const(name: str, value: float) -> list:
    """A Constant node as Paddle2ONNX writes one (a 1-element float tensor)."""
    tensor = numpy_helper.from_array(np.array([value], np.float32), name)
    return [helper.make_node("Constant", [], [name], name=name, value=tensor)]


def _paddle_hardswish(opset: int = 11, extra_reader: bool = False):
    """Conv → BatchNormalization → HardSwish as Paddle2ONNX exports it at opset 11 (Add 3, Clip 0..6,
    Mul with the BN output, Div 6, constants as Constant nodes) → Conv. With ``extra_reader`` the BN
    output also feeds an Add to the second conv's output (then the chain must stay unfused)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in [
        ("w1", rng.standard_normal((8, 3, 3, 3)) * 0.4), ("w2", rng.standard_normal((8, 8, 1, 1)) * 0.3),
        ("g", rng.uniform(0.5, 1.5, 8)), ("b", rng.standard_normal(8) * 0.1),
        ("m", rng.standard_normal(8) * 0.1), ("v", rng.uniform(0.5, 1.5, 8))]]
    nodes = _const("three", 3.0) + _const("zero", 0.0) + _const("six", 6.0) + _const("six_d", 6.0) + [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], name="bn1"),
        helper.make_node("Add", ["bn", "three"], ["Add@0"], name="Add@0"),
        helper.make_node("Clip", ["Add@0", "zero", "six"], ["Clip@0"], name="Clip@0"),
        helper.make_node("Mul", ["bn", "Clip@0"], ["Mul@0"], name="Mul@0"),
        helper.make_node("Div", ["Mul@0", "six_d"], ["hswish"], name="Div@0"),
        helper.make_node("Conv", ["hswish", "w2"], ["y" if not extra_reader else "c2"], name="conv2")]
    if extra_reader:
        nodes.append(helper.make_node("Add", ["c2", "bn"], ["y"], name="residual"))
    graph = helper.make_graph(nodes, "paddle_hswish",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def _module(model, method: str = "flexround") -> BlockModule:
    config = onnxflex.QuantConfig(method=method)
    plan = build_plan(model, resolve(config).plan)
    block = next(b for b in plan.blocks if "Div@0" in b.nodes)
    state = QuantState()
    add_block_quantizers(block, plan.model, state, get_target("onnxruntime"), resolve(config).rounding, method,
                         torch.device("cpu"))
    for act in state.acts.values():  # a step that clamps part of the range, so both gradient cases occur
        act.calibrate(-4.0, 4.0, None, "minmax")
    return BlockModule(block, plan.model, default_opset(plan.model), state, torch.device("cpu"))


def _inputs() -> torch.Tensor:
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 2.0
    return x


def _outputs_and_grads(module: BlockModule, fused: bool):
    module.fused = fused
    module.zero_grad(set_to_none=True)
    module.train()
    out = module({"x": _inputs()})
    loss = sum((v * torch.linspace(-1, 1, v.numel()).reshape(v.shape)).sum() for v in out.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_a_paddle_hardswish_chain_is_fused_and_exact_in_outputs_and_gradients():
    module = _module(_paddle_hardswish())
    ops = [n.op_type for n, _, _ in module.nodes]
    assert "HardSwish" in ops and "Clip" not in ops and "Div" not in ops, ops
    fused, fused_grads = _outputs_and_grads(module, True)
    plain, plain_grads = _outputs_and_grads(module, False)
    assert fused_grads.keys() == plain_grads.keys() and len(plain_grads) >= 3, sorted(plain_grads)
    for name in plain:
        assert torch.equal(_bits(fused[name]), _bits(plain[name])), f"output {name} differs"
    for name in plain_grads:
        diff = float((fused_grads[name] - plain_grads[name]).abs().max())
        assert torch.equal(_bits(fused_grads[name]), _bits(plain_grads[name])), f"grad {name}: max diff {diff}"


def test_the_fused_hardswish_gradient_is_exact_at_the_clip_boundaries():
    """x + 3 at exactly 0 and 6 (the clamp passes the gradient there), beyond them, ±0 and inf."""
    from onnxflex.rounding.fusion import _HardSwish

    x = torch.tensor([-3.0, 3.0, -3.0000002, 3.0000002, -0.0, 0.0, -1e30, 1e30, float("inf"), -float("inf"),
                      0.1, -2.9, 2.9] + torch.randn(200, generator=torch.Generator().manual_seed(2)).mul(4).tolist())
    three, zero, six = (torch.tensor([v]) for v in (3.0, 0.0, 6.0))
    grad = torch.linspace(-2, 2, x.numel())
    a = x.clone().requires_grad_()
    plain = torch.div(torch.mul(a, torch.clamp(torch.add(a, three), zero, six)), six)
    plain.backward(grad)
    b = x.clone().requires_grad_()
    fused = _HardSwish.apply(b, three, six)
    fused.backward(grad)
    assert torch.equal(_bits(fused.detach()), _bits(plain.detach()))
    assert torch.equal(_bits(b.grad), _bits(a.grad)), (b.grad - a.grad).abs().max()


def test_a_chain_whose_input_has_another_reader_stays_unfused():
    module = _module(_paddle_hardswish(extra_reader=True))
    ops = [n.op_type for n, _, _ in module.nodes]
    assert "HardSwish" not in ops and "Div" in ops, ops


class _Old(torch.autograd.Function):
    """The fake quantizer's earlier forward: the inside mask from |round(u) + z − q| in five ops."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        u = x / scale
        q, unclamped = _integers(u, zero_point, qmin, qmax)
        inside = unclamped.sub_(q).abs_().clamp_max_(1.0).neg_().add_(1.0)
        levels = q.sub_(zero_point)
        ctx.save_for_backward(inside, torch.addcmul(levels, u, inside, value=-1.0))
        return levels * scale

    @staticmethod
    def backward(ctx, grad):
        inside, saved = ctx.saved_tensors
        return grad * inside, (grad * saved).sum().reshape(()), None, None, None


@pytest.mark.parametrize("zero, qmin, qmax", [(128.0, 0, 255), (0.0, -128, 127), (0.0, 0, 255)])
def test_the_fake_quantizer_equals_its_earlier_form_bit_for_bit(zero, qmin, qmax):
    s = 0.0123
    edges = [-0.0, 0.0, 1e30, -1e30, 0.5 * s, -0.5 * s, 1.5 * s, 127.5 * s, -128.5 * s, 255.5 * s, 1e-9, -1e-9]
    x = torch.cat([torch.randn(20_000, generator=torch.Generator().manual_seed(4)) * 3, torch.tensor(edges)])
    grad = torch.linspace(-1, 1, x.numel())
    results = []
    for fn in (_Old, _FakeQuant):
        xx, ss = x.clone().requires_grad_(), torch.tensor(s, requires_grad=True)
        y = fn.apply(xx, ss, torch.tensor(zero), qmin, qmax)
        y.backward(grad)
        results.append((y.detach(), xx.grad, ss.grad))
    for old, new, what in zip(*results, ("output", "grad x", "grad scale")):
        assert torch.equal(_bits(old), _bits(new)), f"{what} differs"


class _Recorder:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1


def test_reused_pages_sets_the_thresholds_and_resets_them_even_on_error(monkeypatch):
    libc = _Recorder()
    monkeypatch.setattr(heap, "_libc", lambda: libc)
    with pytest.raises(RuntimeError):
        with heap.reused_pages():
            with heap.reused_pages():  # nested: the outer one's settings hold, nothing set twice
                pass
            assert libc.calls == [("mallopt", p, v) for p, v in heap.KEEP.items()]
            raise RuntimeError("a step failed")
    restored = [("mallopt", p, v) for p, v in heap.AFTER.items()]
    assert libc.calls[len(heap.KEEP):] == restored, libc.calls
    assert heap._depth == 0


def test_reused_pages_runs_on_this_c_library_and_is_a_no_op_elsewhere(monkeypatch):
    with heap.reused_pages():  # the real one (glibc here, or none)
        torch.ones(1 << 20).sum()
    monkeypatch.setattr(heap, "_libc", lambda: None)
    with heap.reused_pages():
        pass
    assert heap._depth == 0


TRIM_CHILD = """
import numpy as np, sys
from onnxflex.rounding import heap
def anon():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) >> 10
with heap.reused_pages():  # as the block loop runs: no mmap, so freed arrays stay in the heap
    arrays = [np.ones(1 << 16) for _ in range(1200)]  # 600 MiB of 0.5 MiB arrays ...
    del arrays[::2]  # ... every other one freed: 300 MiB of holes between live arrays
    before = anon()
    small = heap.trim_freed(limit=1 << 40)  # below the limit: nothing given back
    trimmed = heap.trim_freed(limit=64 << 20)
    print(before, small, trimmed, anon())
"""


def test_trim_freed_gives_a_fragmented_free_heap_back_between_blocks():
    """In a fresh interpreter on glibc: 300 MiB freed in holes between live arrays stays resident inside
    reused_pages(); trim_freed gives it back once it exceeds the limit, and leaves it below."""
    if heap._libc() is None or not hasattr(heap._libc(), "mallinfo2"):
        assert not heap.trim_freed(0)  # the documented no-op
        return
    out = subprocess.run([sys.executable, "-c", TRIM_CHILD], capture_output=True, text=True, check=True).stdout
    before, small, trimmed, after = out.split()
    assert (small, trimmed) == ("False", "True"), out
    assert int(before) - int(after) > 200, out  # MiB of RssAnon returned


@pytest.mark.parametrize("bounds", [(0.0, 6.0), (-1.5, 2.25), (0.0, 1.0), (-3.4028234663852886e38, 1e-3)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_clamp_equals_torch_clamp_bit_for_bit_with_its_one_pass_gradient(bounds, as_tensor):
    """Outputs and gradients of rounding.clamp against torch.clamp's autograd at the bounds, their float32
    neighbours, ±0 and ±inf; the fast gradient is the one that ran."""
    from onnxflex.rounding.clamp import clamp

    lo, hi = bounds
    with np.errstate(over="ignore"):
        near = [float(np.nextafter(np.float32(b), np.float32(t))) for b in bounds for t in (-np.inf, np.inf)]
    x = torch.tensor([lo, hi, *near, -0.0, 0.0, float("inf"), -float("inf"), 1e30, -1e30]
                     + torch.randn(500, generator=torch.Generator().manual_seed(5)).mul(3).tolist())
    grad = torch.linspace(-2, 2, x.numel())
    low, high = (torch.tensor(lo), torch.tensor(hi)) if as_tensor else (lo, hi)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain, fast = torch.clamp(a, low, high), clamp(b, low, high)
    assert type(fast.grad_fn).__name__ == "_ClampBackward", fast.grad_fn
    plain.backward(grad)
    fast.backward(grad)
    assert torch.equal(_bits(fast.detach()), _bits(plain.detach()))
    assert torch.equal(_bits(b.grad), _bits(a.grad)), (b.grad - a.grad).abs().max()


def test_clamp_is_torch_clamp_where_its_gradient_would_not_be_exact():
    """float64 input, a bound that learns, a bound with several values: torch's own clamp runs."""
    from onnxflex.rounding.clamp import clamp

    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    assert type(clamp(x, 0.0, 1.0).grad_fn).__name__ != "_ClampBackward"
    y = torch.randn(10, requires_grad=True)
    assert type(clamp(y, torch.tensor(0.0, requires_grad=True), torch.tensor(1.0)).grad_fn).__name__ \
        != "_ClampBackward"
    out = clamp(y, torch.zeros(10), torch.ones(10))
    assert type(out.grad_fn).__name__ != "_ClampBackward" and torch.equal(out, y.clamp(0.0, 1.0))


def test_reused_pages_turn_off_mmap_inside_and_allow_it_again_after():
    """glibc refuses an mmap threshold above 32 MiB, so larger step tensors would still be mapped fresh:
    inside, no allocation is mmapped (M_MMAP_MAX 0); after, glibc's default count is back."""
    assert heap.KEEP[heap.M_MMAP_MAX] == 0 and heap.AFTER[heap.M_MMAP_MAX] == 65536


def test_the_whole_block_loop_runs_inside_reused_pages(monkeypatch):
    """Round-to-nearest learns nothing, yet its calibration and quantized-output runs allocate batch-sized
    tensors too: the block loop (reconstruct) enters reused_pages once, around every block."""
    from graphs import gemm_mlp
    from onnxflex.config import QuantConfig

    libc = _Recorder()
    monkeypatch.setattr(heap, "_libc", lambda: libc)
    x = np.random.default_rng(0).standard_normal((24, 32)).astype(np.float32)
    onnxflex.quantize(gemm_mlp(), {"x": x}, QuantConfig(method="rtn", verify_samples=4), progress=False)
    keep = [("mallopt", p, v) for p, v in heap.KEEP.items()]
    after = [("mallopt", p, v) for p, v in heap.AFTER.items()]
    assert libc.calls == keep + after, libc.calls


def _hugepage_advice() -> bool:
    """numpy's current huge page setting (its switch returns the setting it replaces)."""
    switch = np._core.multiarray._set_madvise_hugepage
    now = switch(True)
    switch(now)
    return now


def test_small_pages_turns_numpys_huge_page_advice_off_inside_and_restores_it(monkeypatch):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    before = _hugepage_advice()
    with pytest.raises(RuntimeError):
        with heap.small_pages():
            assert _hugepage_advice() is False
            raise RuntimeError("body failed")
    assert _hugepage_advice() is before
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")  # the caller chose: left as it is
    switch = np._core.multiarray._set_madvise_hugepage
    old = switch(True)
    try:
        with heap.small_pages():
            assert _hugepage_advice() is True
    finally:
        switch(old)


def test_quantize_captures_and_reconstructs_without_huge_page_advice(monkeypatch):
    """The pipeline runs inside small_pages: capture's fresh rows would stall on compaction otherwise."""
    from graphs import gemm_mlp
    from onnxflex import stages
    from onnxflex.config import QuantConfig

    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    seen = []
    for name in ("capture_fp32", "reconstruct_blocks"):
        def spy(*args, _real=getattr(stages, name), **kwargs):
            seen.append(_hugepage_advice())
            return _real(*args, **kwargs)
        monkeypatch.setattr(f"onnxflex.pipeline.{name}", spy)
    x = np.random.default_rng(0).standard_normal((24, 32)).astype(np.float32)
    onnxflex.quantize(gemm_mlp(), {"x": x}, QuantConfig(method="rtn", verify_samples=4), progress=False)
    assert seen == [False, False]


@pytest.mark.parametrize("zero, qmin, qmax", [(128.0, 0, 255), (0.0, -128, 127), (0.0, 0, 255)])
def test_the_fake_quantizer_without_gradients_gives_the_forward_bit_for_bit(zero, qmin, qmax):
    """The no-gradient path (in place on one tensor) writes the bits the autograd forward writes."""
    from onnxflex.rounding.quant import fake_quant

    s = 0.0123
    edges = [-0.0, 0.0, 1e30, -1e30, 0.5 * s, -0.5 * s, 1.5 * s, 127.5 * s, -128.5 * s, 255.5 * s, 1e-9, -1e-9]
    x = torch.cat([torch.randn(20_000, generator=torch.Generator().manual_seed(5)) * 3, torch.tensor(edges)])
    scale, zp = torch.tensor(s), torch.tensor(zero)
    with torch.no_grad():
        plain = fake_quant(x, scale, zp, qmin, qmax)
    graded = _FakeQuant.apply(x.clone().requires_grad_(), scale.clone().requires_grad_(), zp, qmin, qmax)
    assert torch.equal(_bits(plain), _bits(graded.detach())), "the no-gradient fake_quant differs"
    assert torch.equal(x[:3], torch.randn(20_000, generator=torch.Generator().manual_seed(5))[:3] * 3), "input written"


@pytest.mark.parametrize("method", ["flexround", "adaround", "signround"])
def test_a_large_weights_rounding_is_recomputed_in_the_backward_with_the_same_gradients(method, monkeypatch):
    """torchify.quantized_weight: a learning rounder's weight of RECOMPUTE_VALUES or more keeps no
    weight-sized tensor of its rounding graph from the forward to the backward (checkpointing), and its
    parameters get the gradients they get without it, bit for bit; without gradients nothing changes."""
    from onnxflex.rounding import torchify
    from onnxflex.rounding.methods import make_rounder

    weight = torch.randn(96, 160, generator=torch.Generator().manual_seed(2))
    x = torch.randn(24, 96, generator=torch.Generator().manual_seed(3))
    grads, saved = {}, {}
    for recompute in (True, False):
        monkeypatch.setattr(torchify, "RECOMPUTE_VALUES", weight.numel() if recompute else weight.numel() + 1)
        torch.manual_seed(0)
        rounder = make_rounder(method, weight, 1, 4, "mse", 32)
        rounder.train(True)
        held = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(t.numel()) or t, lambda t: t):
            loss = (x @ torchify.quantized_weight(rounder)).square().sum()
        saved[recompute] = sum(held)
        loss.backward()
        grads[recompute] = [p.grad.clone() for p in rounder.parameters() if p.grad is not None]
    assert grads[True] and len(grads[True]) == len(grads[False])
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(_bits(a), _bits(b))
    assert saved[False] >= 3 * weight.numel() and saved[True] < weight.numel(), saved
    rounder.train(False)
    assert torch.equal(torchify.quantized_weight(rounder), rounder.fake_quant())
