"""onnxflex.options: the user's QuantConfig stays as given; resolve() splits it into one record per stage."""
from __future__ import annotations

import dataclasses

import pytest

from onnxflex.config import QuantConfig
from onnxflex.options import PLANNED_FIELDS, PRESET_FIELDS, PlanOptions, Resolved, resolve


def _record_fields(resolved: Resolved) -> dict[str, set[str]]:
    return {part.name: {f.name for f in dataclasses.fields(getattr(resolved, part.name))}
            for part in dataclasses.fields(resolved)}


def test_every_option_reaches_a_stage_record_and_to_dict_keeps_the_config_order():
    resolved = resolve(QuantConfig())
    records = _record_fields(resolved)
    covered = set().union(*records.values()) - PLANNED_FIELDS - PRESET_FIELDS
    names = [f.name for f in dataclasses.fields(QuantConfig)]
    assert covered == set(names), f"options in no record: {set(names) - covered}; unknown: {covered - set(names)}"
    assert list(resolved.to_dict()) == names
    assert records["plan"] >= {"wbits", "target", "exclude_nodes", "layer_bits"}
    assert "batch_size" in records["rounding"] and all("batch_size" not in r for k, r in records.items()
                                                       if k != "rounding"), "batch_size must have one home"


def test_the_config_keeps_what_was_given_and_resolve_changes_nothing():
    given = QuantConfig(preset="best", iters=7, bits_budget=3)
    resolved = resolve(given)
    assert (given.iters, given.batch_size, given.early_stop, given.lr, given.bits_budget) == (7, -1, -1, -1.0, 3)
    assert given == QuantConfig(preset="best", iters=7, bits_budget=3), "resolve must not change its input"
    assert (resolved.rounding.batch_size, resolved.rounding.lr, resolved.budgets.bits_budget) == (64, 3e-3, 3.0)
    assert isinstance(resolved.budgets.bits_budget, float)
    assert resolve(given) == resolved, "resolve is a pure function of the config"
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.rounding.iters = 1


def test_copied_values_agree_and_a_record_changed_alone_is_refused():
    resolved = resolve(QuantConfig(abits=0, wbits=4, seed=5, fix_inputs=("sr=8000",), layer_bits=(("a*", 3),)))
    assert resolved.plan.abits == resolved.rounding.abits == 0
    assert resolved.rounding.seed == resolved.data.seed == 5
    assert resolved.plan.fix_inputs == resolved.data.fix_inputs == ("sr=8000",)
    assert resolved.plan.layer_bits == resolved.budgets.layer_bits and resolved.budgets.wbits == 4
    with pytest.raises(RuntimeError, match="seed differs between the resolved records"):
        resolved.replace(data=resolved.data.replace(seed=6)).to_dict()


def test_plan_options_answer_bits_and_exclusions():
    plan = resolve(QuantConfig(wbits=4, layer_bits=(("head*", 8), ("*", 6)), exclude_nodes=("stem*",),
                               exclude_op_types=("Gemm",))).plan
    assert isinstance(plan, PlanOptions)
    assert (plan.bits_for("head.0"), plan.bits_for("body"), resolve(QuantConfig(wbits=4)).plan.bits_for("x")) == (8, 6, 4)
    assert plan.keeps_float("stem.conv", "Conv") and plan.keeps_float("fc", "Gemm")
    assert not plan.keeps_float("body", "Conv")
