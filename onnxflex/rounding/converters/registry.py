"""Registry of ONNX → torch op converters, keyed by (op_type, since_version).

A converter is a pure function ``fn(node: OpNode, inputs: list[Tensor | None]) -> tuple[Tensor, ...]``:
it receives the node's inputs in ONNX order (``None`` for an omitted optional input) and returns
its outputs in ONNX order. It never looks up weights itself: the block interpreter passes every
input, initializers included, so a rounder can stand in for a weight under the weight's own name.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxflex.errors import RegistryError

Converter = Callable[["OpNode", Sequence[Any]], tuple]


@dataclass(frozen=True)
class OpNode:
    """What a converter may know about a node: its type, name, tensor names, decoded attributes, opset."""

    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    opset: int
    attrs: Mapping[str, Any] = field(default_factory=dict)
    domain: str = ""

    @classmethod
    def from_proto(cls, node: onnx.NodeProto, opset: int) -> "OpNode":
        attrs = {}
        for a in node.attribute:
            value = helper.get_attribute_value(a)
            if isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, onnx.TensorProto):
                value = numpy_helper.to_array(value)
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                value = [v.decode() for v in value]
            attrs[a.name] = value
        return cls(node.op_type, node.name, tuple(node.input), tuple(node.output), opset, attrs, node.domain)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


_CONVERTERS: dict[str, list[tuple[int, Converter]]] = {}
CONTRIB_DOMAINS = ("com.microsoft",)  # onnxruntime's own ops, which converters may be registered for


def _key(op_type: str, domain: str) -> str:
    """Registry key: the op type in the default domain, ``domain:op_type`` in another."""
    return op_type if domain in ("", "ai.onnx") else f"{domain}:{op_type}"


def converter(op_type: str, since: int = 1, domain: str = "") -> Callable[[Converter], Converter]:
    """Register ``fn`` for ``op_type`` from opset ``since`` until the next registered version. ``domain``:
    the default (ONNX, whose opset ``since`` counts) or one of CONTRIB_DOMAINS (onnxruntime's ops, one
    version each: ``since`` is 1)."""
    if domain not in ("", "ai.onnx", *CONTRIB_DOMAINS):
        raise RegistryError(f"converter ({op_type!r}) for domain {domain!r}: domains are the default and "
                            f"{', '.join(CONTRIB_DOMAINS)}")

    def decorate(fn: Converter) -> Converter:
        versions = _CONVERTERS.setdefault(_key(op_type, domain), [])
        if any(v == since for v, _ in versions):
            raise RegistryError(f"converter ({op_type!r}, since {since}) is registered twice")
        bisect.insort(versions, (since, fn), key=lambda item: item[0])
        return fn

    return decorate


def find_converter(op_type: str, opset: int, domain: str = "") -> Converter | None:
    """The converter for ``op_type`` of ``domain`` in a model of default-domain ``opset``, or None (a
    contrib domain's converters are one version each, whatever the default opset)."""
    versions = _CONVERTERS.get(_key(op_type, domain), [])
    if domain not in ("", "ai.onnx"):
        return versions[-1][1] if domain in CONTRIB_DOMAINS and versions else None
    usable = [fn for since, fn in versions if since <= opset]
    return usable[-1] if usable else None


def supported_ops(domain: str = "") -> list[str]:
    """The op types with a converter in ``domain``."""
    prefix = _key("", domain)
    return sorted(k[len(prefix):] for k in _CONVERTERS if (":" in k) == bool(prefix) and k.startswith(prefix))


def numpy_value(t: Any) -> np.ndarray:
    """A constant input (shape, axes, pads…) as a numpy array, for converters that need Python values."""
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def unsupported(node: OpNode, what: str) -> NotImplementedError:
    """The error a converter raises for an attribute value it cannot express; the block then runs in
    onnxruntime instead of torch."""
    return NotImplementedError(f"{node.op_type} node {node.name!r} (opset {node.opset}): {what} is not supported")


def const_ints(t: Any) -> list[int] | None:
    """A constant int input or attribute as Python ints (numpy scalars overflow torch's int args)."""
    return None if t is None else [int(v) for v in numpy_value(t).reshape(-1)]


def optional_input(inputs: Sequence[Any], i: int) -> Any:
    """Input ``i``, or None when the node omits it."""
    return inputs[i] if len(inputs) > i else None
