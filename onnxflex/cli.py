"""The command line: parse, build a config, call the API, print.

The options of ``quantize`` are generated from QuantConfig's fields and OPTION_HELP, so defaults and
help live in one place; ``--config FILE.toml`` supplies any of them and flags given on the command
line win over the file.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import click

from onnxflex.config import OPTION_HELP, QuantConfig, choices, read_toml
from onnxflex.errors import ConfigError, OnnxflexError, VerificationError
from onnxflex.exits import (FAILED, INTERNAL, OK, SIGINT_EXIT, SIGTERM_EXIT, Terminated, crash_log, exit_promptly,
                            internal_error_line, sigterm_unwinds)
from onnxflex.options import given_toml, resolve

LOG_LEVELS = ("debug", "info", "warning", "error")
# Flags whose name is not the field's name with dashes (repeatable options read better singular).
FLAGS = {"exclude_nodes": "--exclude-node", "exclude_op_types": "--exclude-op-type",
         "input_shapes": "--input-shape", "fix_inputs": "--fix-input", "batch_axes": "--batch-axis"}


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(message)s", stream=sys.stderr, force=True)


def flag_of(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _option(field: dataclasses.Field):
    default = field.default if field.default is not dataclasses.MISSING else None
    allowed = choices().get(field.name)
    kwargs: dict = {"default": None, "help": f"{OPTION_HELP[field.name]} [default: {_shown(default)}]"}
    if isinstance(default, bool):
        decls = [f"{flag_of(field.name)}/--no-{flag_of(field.name)[2:]}"]
    else:
        decls = [flag_of(field.name)]
        if isinstance(default, tuple):
            kwargs.update(multiple=True, default=())
        elif allowed:
            kwargs["type"] = click.Choice(allowed)
        else:
            kwargs["type"] = type(default)
    return click.option(*decls, field.name, **kwargs)


def _shown(default) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple) or default == "":
        return ", ".join(map(str, default)) or "none"
    return str(default)


def config_options(names: tuple[str, ...] | None = None):
    """Decorator adding one option per QuantConfig field (or the ``names`` given) and ``--config``."""

    def decorate(command):
        command = click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                               help="TOML file of options (keys named like the fields); flags win over it.")(command)
        for field in reversed(dataclasses.fields(QuantConfig)):
            if names is None or field.name in names:
                command = _option(field)(command)
        return command

    return decorate


def given_options(config_file: Path | None, options: dict) -> dict:
    """The options as the user gave them: the config file's keys, then the flags given (which win)."""
    given = {k: v for k, v in options.items() if v is not None and v != ()}
    if "layer_bits" in given:
        given["layer_bits"] = tuple(_layer_bits(spec) for spec in given["layer_bits"])
    return {**(read_toml(config_file) if config_file is not None else {}), **given}


def build_config(config_file: Path | None, options: dict) -> QuantConfig:
    return QuantConfig.from_dict(given_options(config_file, options), source=str(config_file or "options"))


def _layer_bits(spec: str) -> tuple[str, int]:
    pattern, sep, bits = spec.rpartition("=")
    if not sep or not pattern or not bits.strip().isdigit():
        raise ConfigError(f"--layer-bits {spec!r} is not PATTERN=BITS (for example 'head*=8')")
    return pattern, int(bits)


def options_markdown() -> str:
    """The README's options table, generated from the config."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(QuantConfig):
        allowed = choices().get(field.name)
        meaning = OPTION_HELP[field.name] + (f" ({', '.join(allowed)})" if allowed else "")
        rows.append(f"| `{flag_of(field.name)}` | {_shown(field.default)} | {meaning} |")
    return "\n".join(rows) + "\n"


class OnnxflexCommand(click.Command):
    """Runs a command under the exit codes of onnxflex.exits: an OnnxflexError prints one line and exits
    with its class's code (2, verification 1); click's own exits and usage errors pass through (2);
    SIGINT and SIGTERM unwind the command (its cleanup runs) and exit 130 / 143; any other exception is
    an internal error, 3, with its traceback in a log file."""

    def invoke(self, ctx):
        try:
            with sigterm_unwinds():
                return super().invoke(ctx)
        except OnnxflexError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo(f"interrupted (SIGINT): onnxflex {self.name} stopped, temporary files removed", err=True)
            ctx.exit(SIGINT_EXIT)
        except Terminated:
            click.echo(f"terminated (SIGTERM): onnxflex {self.name} stopped, temporary files removed", err=True)
            ctx.exit(SIGTERM_EXIT)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # a bug: CI must tell it from a failed gate (1) or bad input (2)
            click.echo(internal_error_line(exc, crash_log(exc, self.name)), err=True)
            ctx.exit(INTERNAL)


@click.group(help="Post-training quantization for ONNX models with learned rounding.",
             epilog="Exit codes of every command: 0 ok; 1 a gate or check failed (compare's gates, check's "
                    "fallbacks, a model failing verification); 2 bad input or usage; 3 internal error (traceback "
                    "in the log file named); 130 / 143 interrupted by SIGINT / SIGTERM (temporary files removed).")
@click.version_option(package_name="onnxflex")
def main() -> None:
    pass


@main.command(cls=OnnxflexCommand)
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output model path [default: MODEL with suffix .q.onnx]; the report goes to OUTPUT.report.json.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration data: an .npz (one array per model input, samples on dim 0), or a folder of "
                   ".npy/.npz files or images, or a .txt for a decoder (with --tokenizer, --seq-len) "
                   "[default: MODEL's .calib.npz, else synthetic data].")
@click.option("--dump-config", is_flag=True,
              help="Print the options as given (-1: the method's or preset's default) as TOML, each resolved "
                   "value as a comment, and exit; edit it and pass it back with --config.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
@config_options()
def quantize(model, output, calib, dump_config, quiet, log_level, config_file, **options) -> None:
    """Quantize MODEL and write a QDQ model for the target runtime, with OUTPUT.report.json beside it."""
    config = build_config(config_file, options)
    if dump_config:  # what the user gave, so that editing method or preset in the file takes effect
        click.echo(given_toml(config), nl=False)
        return
    if model is None:
        raise click.UsageError("Missing argument 'MODEL'.")
    from onnxflex.api import quantize as run_quantize, unverified_path
    from onnxflex.report import summary

    _setup_logging("error" if quiet else log_level)
    output = output or model.with_name(model.stem + ".q.onnx")
    from onnxflex.graph import check_output_path

    check_output_path(model, output)  # before the run, not after it
    try:
        result = run_quantize(model, calib, config, progress=not quiet)
    except VerificationError as exc:
        if exc.result is None:
            raise
        kept = unverified_path(output)
        check_output_path(model, kept)
        kept = exc.result.save(kept)
        raise VerificationError(f"{exc} — the model is kept as {kept} with its report {kept}.report.json "
                                f"(not as {output}); check it with onnxflex compare before using it") from None
    path = result.save(output)
    if not quiet:
        click.echo(summary(result.report))
        click.echo(f"wrote {path} and {path}.report.json")


@main.command(cls=OnnxflexCommand)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@config_options(("wbits", "abits", "group_size", "head_bits", "granularity", "target", "exclude_nodes",
                 "exclude_op_types", "layer_bits", "latency_rules"))
def inspect(model, config_file, **options) -> None:
    """Print MODEL's block plan: blocks, quantizable layers, activation quant points, unsupported ops."""
    from onnxflex.graph import load_model
    from onnxflex.pipeline import plan as plan_stage

    _setup_logging("warning")
    plan = plan_stage(load_model(model), resolve(build_config(config_file, options))).plan  # quantize's first stage
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(plan.describe())


@main.command(cls=OnnxflexCommand)
@click.argument("reference", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Evaluation inputs: an .npz with one array per model input (other arrays are ignored).")
@click.option("--samples", type=int, default=0, help="Use at most this many samples (0 = all).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Samples per onnxruntime run.")
@click.option("--worst", type=int, default=5, show_default=True, help="How many of the worst layers to list.")
@click.option("--repeats", type=int, default=20, show_default=True,
              help="Least number of interleaved timing rounds (each runs both models once).")
@click.option("--latency-width", type=click.FloatRange(0.001, 1.0), default=0.05, show_default=True,
              help="Time until the latency ratio's 95% interval is within this relative half-width...")
@click.option("--latency-seconds", type=click.FloatRange(0.0), default=5.0, show_default=True,
              help="...or until this many seconds of timing have passed.")
@click.option("--threads", type=int, default=0, help="onnxruntime intra-op threads for both models (0 = default).")
@click.option("--min-sqnr", type=float, help="Gate: fail when any output's SQNR (dB) is below this.")
@click.option("--min-agreement", type=float,
              help="Gate: fail when top-1 agreement of a classifier-shaped output is below this fraction (0-1).")
@click.option("--max-latency-ratio", type=float,
              help="Gate: fail when the 95% interval of CANDIDATE's latency / REFERENCE's lies wholly above this "
                   "(an interval straddling it passes with a note).")
@click.option("--batch-axis", "batch_axes", multiple=True, metavar="NAME=AXIS", help=OPTION_HELP["batch_axes"])
@click.option("--fix-input", "fix_inputs", multiple=True, metavar="NAME=VALUE",
              help="NAME=VALUE: feed this value to that input of both models, so --data needs no array for it.")
@click.option("--generate", type=click.IntRange(0), default=0,
              help="Compare two decoders with a key/value cache instead: N greedy tokens from each --data sequence's "
                   "first --prompt-len tokens, and a teacher-forced pass over each sequence (KL, perplexity).")
@click.option("--prompt-len", type=click.IntRange(0), default=0,
              help="With --generate: prompt length in tokens (0 = half of each sequence).")
@click.option("--tokenizer", default="", help="With --generate and a .txt --data: the tokenizer.json that tokenizes it.")
@click.option("--seq-len", type=click.IntRange(0), default=0,
              help="With --generate and a .txt --data: tokens per sequence (non-overlapping windows).")
@click.option("--min-token-agreement", type=float,
              help="Gate, with --generate: fail when the fraction of the reference's greedy tokens that CANDIDATE's "
                   "argmax matches (fed the reference's tokens) is below this (0-1).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def compare(reference, candidate, data, as_json, **options) -> None:
    """Compare CANDIDATE (e.g. a quantized model) with REFERENCE (its FP32 model) on --data.

    With --min-sqnr, --min-agreement or --max-latency-ratio it is a gate: exit code 1 and a one-line
    reason when a threshold is not met (2: bad input, 3: an internal error). With --generate N it
    compares greedy generation and held-out KL / perplexity of two decoders (gate: --min-token-agreement).
    """
    generation = {k: options.pop(k) for k in ("generate", "prompt_len", "tokenizer", "seq_len", "min_token_agreement")}
    if generation["generate"]:
        _compare_generation(reference, candidate, data, as_json, generation, options)
        return
    given = [f"--{k.replace('_', '-')}" for k, v in generation.items() if v]
    if given:
        raise click.UsageError(f"{', '.join(given)} apply to --generate N only: add --generate or drop them")
    from onnxflex.inputs import InputOptions
    from onnxflex.compare import GateOptions, compare_models, format_comparison

    _setup_logging("warning")
    gates = GateOptions(min_sqnr=options.pop("min_sqnr"), min_agreement=options.pop("min_agreement"),
                        max_latency_ratio=options.pop("max_latency_ratio"))
    inputs = InputOptions.from_specs(options.pop("batch_axes"), options.pop("fix_inputs"))
    result = compare_models(reference, candidate, data, gates=gates, inputs=inputs, **options)
    if as_json:
        from onnxflex.report import to_json

        click.echo(to_json(result.to_dict()), nl=False)
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
    else:
        click.echo(format_comparison(result))
    if result.failures:
        click.echo(f"gate failed: {result.failures[0]}", err=True)
        sys.exit(FAILED)


def _compare_generation(reference, candidate, data, as_json, generation: dict, options: dict) -> None:
    """compare --generate: onnxflex.generate on both decoders; the output comparison's options do not apply."""
    from onnxflex.generate import compare_generation, format_generation, generation_ids

    ctx = click.get_current_context()
    output_only = ("worst", "repeats", "latency_width", "latency_seconds", "batch_axes", "fix_inputs", "min_sqnr",
                   "min_agreement", "max_latency_ratio")
    given = [f"--{k.replace('_', '-')}" for k in output_only
             if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"{', '.join(given)} compare outputs and do not apply to --generate: drop them")
    _setup_logging("warning")
    ids = generation_ids(data, generation["tokenizer"], generation["seq_len"], options["samples"])
    result = compare_generation(reference, candidate, ids, generation["generate"], prompt_len=generation["prompt_len"],
                                batch_size=options["batch_size"], threads=options["threads"],
                                min_token_agreement=generation["min_token_agreement"])
    if as_json:
        from onnxflex.report import to_json

        click.echo(to_json(result.to_dict()), nl=False)
    else:
        click.echo(format_generation(result))
    if result.failures:
        click.echo(f"gate failed: {result.failures[0]}", err=True)
        sys.exit(FAILED)


@main.command(cls=OnnxflexCommand)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(choices()["target"]), default=QuantConfig().target, show_default=True,
              help="Runtime whose integer-execution rules apply.")
@click.option("--static-only", is_flag=True,
              help="Only the static rules: do not load the model in onnxruntime or build a TensorRT engine.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(model, target, static_only, as_json) -> None:
    """Report, per node, what keeps MODEL's layers from running as integers on --target.

    Exit code 1 when any layer (or residual Add / Concat) falls back to float (2: bad input, 3: an
    internal error).
    """
    from onnxflex.check import check as run_check
    from onnxflex.check import format_report

    _setup_logging("warning")
    report = run_check(model, target, runtime=not static_only)
    if as_json:
        from onnxflex.report import to_json

        click.echo(to_json(report.to_dict()), nl=False)
    else:
        click.echo(format_report(report))
    if not report.ok:
        sys.exit(FAILED)


def run() -> None:
    """The console entry point (``onnxflex``, ``python -m onnxflex.cli``): ``main`` with its exit code,
    ended by exits.exit_promptly (no interpreter teardown once the command's work and cleanup are done)."""
    try:
        main()
    except SystemExit as exc:
        exit_promptly(exc.code)
    exit_promptly(OK)


if __name__ == "__main__":
    run()
