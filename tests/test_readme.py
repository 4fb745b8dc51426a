"""The README's commands run as written (paths under /tmp redirected to a temporary folder)."""
from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import onnx
import pytest

from helpers import MODELS, ROOT, run_cli
from onnxflex.cli import flag_of, options_markdown
from onnxflex.config import QuantConfig

README = (ROOT / "README.md").read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands(program: str) -> list[str]:
    return [line for block in command_blocks(program) for line in block]


def command_blocks(program: str) -> list[list[str]]:
    """The ``program`` lines of each sh block that has any; a block's lines run in order in one folder."""
    blocks = [[line.strip() for line in block.splitlines() if line.strip().startswith(program + " ")]
              for block in code_blocks("sh")]
    return [block for block in blocks if block]


@pytest.fixture
def workdir(tmp_path):
    """The repo's models plus the README's placeholder files model.onnx and calib.npz."""
    shutil.copytree(MODELS, tmp_path / "models")
    shutil.copy(MODELS / "digits_cnn.onnx", tmp_path / "model.onnx")
    shutil.copy(MODELS / "digits_cnn.calib.npz", tmp_path / "calib.npz")
    return tmp_path


def test_readme_has_the_commands_this_suite_runs():
    assert len(commands("onnxflex")) >= 3, commands("onnxflex")
    assert "pytest" in [line.strip() for block in code_blocks("sh") for line in block.splitlines()]


@pytest.mark.parametrize("block", command_blocks("onnxflex"), ids=lambda block: block[0][:60])
def test_readme_cli_commands(block, workdir):
    for command in block:
        args = shlex.split(command.replace("/tmp/", f"{workdir}/"))[1:]
        result = run_cli(*args, cwd=workdir, timeout=300)
        assert result.returncode == 0, f"{command!r} failed:\n{result.stdout}\n{result.stderr}"
        check_output(args, result.stdout, workdir)


def check_output(args: list[str], stdout: str, workdir) -> None:
    if "--dump-config" in args:
        QuantConfig.from_dict(tomllib.loads(stdout))
    elif args[0] == "quantize":
        out = workdir / args[args.index("-o") + 1]
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        assert (workdir / f"{out}.report.json").is_file()
        assert "SQNR vs FP32" in stdout
    elif args[0] == "compare":
        assert "gates: all passed" in stdout, stdout
    elif args[0] == "check":
        assert "result: OK" in stdout, stdout
    else:
        assert "blocks" in stdout


def test_readme_lists_every_option():
    table = options_markdown()
    assert table in README, "README's options table is stale; paste onnxflex.cli.options_markdown() into it"
    for field in dataclasses.fields(QuantConfig):
        assert f"`{flag_of(field.name)}`" in README, f"README does not list {flag_of(field.name)}"


def test_readme_python_example(workdir):
    code = code_blocks("python")[0].replace("/tmp/", f"{workdir}/")
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (workdir / "digits_cnn.w4a8.onnx").is_file()
    assert "logits" in result.stdout
