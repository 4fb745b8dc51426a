"""Config files, --dump-config, flags over files, per-layer overrides, report and output control."""
from __future__ import annotations

import dataclasses
import json
import tomllib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import onnxflex
from helpers import CNN
from onnxflex.cli import main
from onnxflex.config import QuantConfig
from onnxflex.errors import ConfigError
from onnxflex.options import resolve


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_dump_config_prints_every_option_and_reads_back(tmp_path):
    result = invoke("quantize", "--dump-config", "--wbits", "4", "--layer-bits", "head*=8", "--exclude-node", "a")
    assert result.exit_code == 0, result.stderr
    values = tomllib.loads(result.stdout)
    assert set(values) == set(QuantConfig().to_dict()), "dump-config must list every option"
    config = QuantConfig.from_dict(values)
    assert config == QuantConfig(wbits=4, layer_bits=(("head*", 8),), exclude_nodes=("a",))
    pinned = tmp_path / "pinned.toml"
    pinned.write_text(result.stdout)
    again = invoke("quantize", "--dump-config", "--config", pinned)
    assert again.stdout == result.stdout, "a dumped config must pin the run exactly"


def test_flags_win_over_the_config_file(tmp_path):
    path = tmp_path / "q.toml"
    path.write_text('wbits = 4\nmethod = "rtn"\n[layer_bits]\n"conv*" = 3\n')
    result = invoke("quantize", "--dump-config", "--config", path, "--wbits", "6")
    config = QuantConfig.from_dict(tomllib.loads(result.stdout))
    assert (config.wbits, config.method, config.layer_bits) == (6, "rtn", (("conv*", 3),))


def test_unknown_key_in_config_file_is_exit_2_naming_it(tmp_path):
    path = tmp_path / "q.toml"
    path.write_text("wbits = 4\nwbit = 3\n")
    result = invoke("quantize", "--dump-config", "--config", path)
    assert result.exit_code == 2
    assert "unknown key(s) wbit" in result.stderr and "q.toml" in result.stderr


def test_bad_values_in_config_files_are_errors(tmp_path):
    path = tmp_path / "q.toml"
    path.write_text("wbits = 11\n")
    with pytest.raises(ConfigError, match=r"wbits=11 is out of range"):
        QuantConfig.from_toml(path)
    path.write_text("wbits = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        QuantConfig.from_toml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        QuantConfig.from_toml(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"layer_bits\['x'\]=9"):
        QuantConfig(layer_bits=(("x", 9),))
    with pytest.raises(ConfigError, match="is not NAME:DxDx"):
        QuantConfig(input_shapes=("x-1x3",))
    assert invoke("quantize", "--dump-config", "--layer-bits", "conv").exit_code == 2


def test_quantize_needs_a_model_unless_dumping():
    result = invoke("quantize")
    assert result.exit_code == 2 and "Missing argument 'MODEL'" in result.stderr


def _weight_ints(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Integer initializers feeding weight DequantizeLinear nodes, keyed by the node that reads them."""
    inits = {t.name: t for t in model.graph.initializer}
    dq_out = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    ints = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.input[1] in dq_out:
            tensor = inits[dq_out[node.input[1]]]
            ints[node.name] = numpy_helper.to_array(tensor)
    return ints


def test_layer_bits_and_float_patterns_from_a_config_file(tmp_path):
    path = tmp_path / "q.toml"
    path.write_text('method = "rtn"\nwbits = 8\nexclude_nodes = ["/stem/*"]\n'
                    '[layer_bits]\n"/stage2/*" = 3\n"/head*" = 8\n"*" = 4\n')
    out = tmp_path / "q.onnx"
    result = invoke("quantize", CNN, "--config", path, "--quiet", "-o", out)
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "q.onnx.report.json").read_text())
    bits = {row["node"]: row["bits"] for row in report["layers"]}
    assert not [n for n in bits if n.startswith("/stem/")], "excluded stem layers were quantized"
    assert {b for n, b in bits.items() if n.startswith("/stage2/")} == {3}
    assert {b for n, b in bits.items() if n.startswith("/stage1/")} == {4}
    ints = _weight_ints(onnx.load(str(out)))
    for node, b in bits.items():
        lo, hi = -(1 << (b - 1)), (1 << (b - 1)) - 1
        assert lo <= ints[node].min() and ints[node].max() <= hi, f"{node}: ints outside {b}-bit range"
    float_convs = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv" and n.name.startswith("/stem/")]
    assert float_convs and all(not _reads_dq(n, out) for n in float_convs)


def _reads_dq(node, path) -> bool:
    model = onnx.load(str(path))
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return node.input[1] in dq_out


def test_report_has_config_versions_losses_layers_verification_and_timings(quantized_cnn):
    report = quantized_cnn(method="rtn").report
    assert report["config"] == resolve(QuantConfig(method="rtn")).to_dict()
    assert {"onnxflex", "onnx", "onnxruntime", "torch", "numpy", "python"} <= set(report["versions"])
    assert all({"loss_before", "loss_after", "seconds"} <= set(b) for b in report["blocks"])
    assert all({"bits", "scale_min", "scale_max", "int_min", "int_max"} <= set(l) for l in report["layers"])
    assert report["verification"]["quantized_vs_fp32_sqnr_db"]["logits"] > 30
    assert {"passes", "capture", "reconstruct", "emit", "verify", "total"} <= set(report["timings"])
    json.dumps(report, default=str)


def test_log_level_and_quiet(tmp_path):
    loud = invoke("quantize", CNN, "--method", "rtn", "-o", tmp_path / "a.onnx")
    assert "wrote" in loud.stdout and "INFO" in loud.stderr
    warn = invoke("quantize", CNN, "--method", "rtn", "--log-level", "warning", "-o", tmp_path / "b.onnx")
    assert "wrote" in warn.stdout and "INFO" not in warn.stderr
    quiet = invoke("quantize", CNN, "--method", "rtn", "--quiet", "-o", tmp_path / "c.onnx")
    assert quiet.stdout == "" and quiet.stderr == ""


def test_api_accepts_a_model_proto_and_config_file(tmp_path):
    path = tmp_path / "q.toml"
    path.write_text('method = "rtn"\n')
    result = onnxflex.quantize(onnx.load(str(CNN)), str(CNN.with_name("digits_cnn.calib.npz")),
                               QuantConfig.from_toml(path), progress=False)
    assert result.report["config"]["method"] == "rtn"
    assert result.save(tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(QuantConfig) if isinstance(f.default, bool)])
def test_on_off_options_refuse_anything_but_a_bool(name, tmp_path):
    with pytest.raises(ConfigError, match=rf"{name}='yes' must be true or false"):
        QuantConfig(**{name: "yes"})
    path = tmp_path / "quant.toml"
    path.write_text(f'{name} = "yes"\n')
    with pytest.raises(ConfigError, match=name):
        QuantConfig.from_toml(path)
