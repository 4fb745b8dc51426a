"""The command line: parse, build a config, call the API, print. Defaults live in QuantConfig."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from onnxflex.errors import OnnxflexError

LOG_LEVELS = ("debug", "info", "warning", "error")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(message)s", stream=sys.stderr)


def _config_from_options(options: dict):
    from onnxflex.config import QuantConfig

    given = {k: v for k, v in options.items() if v is not None and v != ()}
    return QuantConfig(**given)


class OnnxflexCommand(click.Command):
    """Maps OnnxflexError to exit code 1 with a one-line message; usage errors keep click's code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OnnxflexError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(help="Post-training quantization for ONNX models with learned rounding.")
@click.version_option(package_name="onnxflex")
def main() -> None:
    pass


@main.command(cls=OnnxflexCommand)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output model path [default: MODEL with suffix .q.onnx]; the report goes to OUTPUT.report.json.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration .npz (one array per model input, samples on dim 0) [default: MODEL's .calib.npz].")
@click.option("--wbits", type=int, help="Weight bits, 2-8.")
@click.option("--abits", type=int, help="Activation bits: 8, or 0 for weight-only.")
@click.option("--method", type=click.Choice(["rtn", "flexround"]), help="Rounding method.")
@click.option("--granularity", type=click.Choice(["block", "layer"]), help="Reconstruction unit.")
@click.option("--target", type=click.Choice(["onnxruntime"]), help="Runtime the model is emitted for.")
@click.option("--iters", type=int, help="Optimisation steps per block.")
@click.option("--batch-size", type=int, help="Samples per optimisation step.")
@click.option("--lr", type=float, help="Learning rate of the rounding parameters.")
@click.option("--seed", type=int, help="Random seed (results are deterministic for a seed).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Capture and reconstruction device.")
@click.option("--max-cache-mb", type=int, help="RAM for captured tensors before they spill to disk.")
@click.option("--calib-samples", type=int, help="Use at most this many calibration samples (0 = all).")
@click.option("--exclude-node", "exclude_nodes", multiple=True, help="Keep this node in float (repeatable).")
@click.option("--exclude-op-type", "exclude_op_types", multiple=True, help="Keep this op type in float (repeatable).")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
def quantize(model, output, calib, quiet, log_level, **options) -> None:
    """Quantize MODEL and write a QDQ model that onnxruntime runs with integer kernels."""
    from onnxflex.api import quantize as run_quantize
    from onnxflex.report import summary

    _setup_logging("error" if quiet else log_level)
    config = _config_from_options(options)
    output = output or model.with_name(model.stem + ".q.onnx")
    result = run_quantize(model, calib, config, progress=not quiet)
    path = result.save(output)
    if not quiet:
        click.echo(summary(result.report))
        click.echo(f"wrote {path} and {path}.report.json")


@main.command(cls=OnnxflexCommand)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--granularity", type=click.Choice(["block", "layer"]), help="Reconstruction unit.")
@click.option("--target", type=click.Choice(["onnxruntime"]), help="Runtime whose placement rules apply.")
@click.option("--abits", type=int, help="Activation bits (0 shows a weight-only plan).")
def inspect(model, **options) -> None:
    """Print MODEL's block plan: blocks, quantizable layers, activation quant points, unsupported ops."""
    from onnxflex.graph import load_model
    from onnxflex.pipeline import build_plan

    _setup_logging("warning")
    plan = build_plan(load_model(model), _config_from_options(options))
    for warning in plan.warnings:
        click.echo(f"warning: {warning}")
    click.echo(plan.describe())


if __name__ == "__main__":
    main()
