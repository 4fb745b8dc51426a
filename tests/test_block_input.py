"""block_input: each block learns on the quantized model's output of the earlier blocks (default) or on
its captured FP input (fp), which makes the blocks independent of each other's results."""
from __future__ import annotations

import pytest

import onnxflex
from helpers import CNN
from onnxflex.config import ConfigError, QuantConfig

FLEX = dict(method="flexround", iters=12, calib_samples=32, batch_size=16, seed=5, device="cpu")


def run(block_input: str):
    result = onnxflex.quantize(CNN, None, QuantConfig(block_input=block_input, **FLEX), progress=False)
    losses = [(b["loss_before"], b["loss_after"]) for b in result.report["blocks"]]
    return result.model.SerializeToString(), losses


def test_default_is_quantized_and_unknown_values_are_refused():
    assert QuantConfig().block_input == "quantized"
    with pytest.raises(ConfigError, match="block_input"):
        QuantConfig(block_input="float")


def test_fp_block_input_changes_later_blocks_only_and_is_deterministic():
    quantized, q_losses = run("quantized")
    fp, fp_losses = run("fp")
    assert run("fp")[0] == fp  # the same seed gives the same bytes
    assert fp != quantized
    # the first block reads the graph input, the same in both modes; a later one learns on other inputs
    assert fp_losses[0] == q_losses[0]
    assert any(a != b for a, b in zip(fp_losses[1:], q_losses[1:])), (fp_losses, q_losses)


def test_cli_and_config_file_take_block_input(tmp_path):
    from click.testing import CliRunner

    from onnxflex.cli import main
    out = str(tmp_path / "m.onnx")
    done = CliRunner().invoke(main, ["quantize", str(CNN), "-o", out, "--block-input", "fp", "--dump-config"])
    assert done.exit_code == 0 and 'block_input = "fp"' in done.output, done.output
    (tmp_path / "c.toml").write_text(done.output)
    assert QuantConfig.from_toml(tmp_path / "c.toml").block_input == "fp"
    refused = CliRunner().invoke(main, ["quantize", str(CNN), "-o", out, "--block-input", "float", "--dump-config"])
    assert refused.exit_code == 2 and "--block-input" in refused.output
