"""checkpoint_dir: a killed run restarted with the same arguments resumes at the next block and writes
the same bytes as an uninterrupted run; a checkpoint of another run is refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import onnxflex
from onnxflex.config import QuantConfig
from onnxflex.errors import ConfigError

from helpers import CNN

SCRIPT = """
import json
import sys
import onnxflex
from onnxflex.config import QuantConfig
options = dict(method="flexround", iters=40, batch_size=16, calib_samples=96, verify_samples=16, seed=3,
               latency_rules=False)  # five blocks to kill between
if sys.argv[2]:
    options["checkpoint_dir"] = sys.argv[2]
result = onnxflex.quantize({model!r}, None, QuantConfig(**options), progress=False)
result.save(sys.argv[1])
print(json.dumps([block["seconds"] for block in result.report["blocks"]]))
"""


def run_script(tmp_path, out, checkpoint="", wait=True):
    script = tmp_path / "quantize.py"
    script.write_text(SCRIPT.format(model=str(CNN)))
    cmd = [sys.executable, str(script), str(out), str(checkpoint)]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def block_files(folder):
    return sorted(p.name for p in folder.glob("block*.pt")) if folder.is_dir() else []


def test_killed_run_resumes_and_writes_the_same_bytes(tmp_path):
    reference = tmp_path / "reference.onnx"
    done = run_script(tmp_path, reference)
    assert done.returncode == 0, done.stderr[-2000:]

    checkpoint, out = tmp_path / "ckpt", tmp_path / "resumed.onnx"
    proc = run_script(tmp_path, out, checkpoint, wait=False)
    deadline = time.monotonic() + 300
    while len(block_files(checkpoint)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = block_files(checkpoint)
    assert 2 <= len(finished) < 5 and not out.exists(), f"killed too late or too early: {finished}"
    assert not [p for p in checkpoint.iterdir() if p.name.startswith(".")], "a half-written checkpoint file"

    saved = [torch.load(checkpoint / name, weights_only=True)["result"]["seconds"] for name in finished]
    resumed = run_script(tmp_path, out, checkpoint)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert out.read_bytes() == reference.read_bytes(), "the resumed run wrote a different model"
    seconds = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert seconds[:len(saved)] == saved, "the finished blocks were learned again instead of restored"
    assert len(block_files(checkpoint)) == 5


def test_checkpoint_of_another_run_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    onnxflex.quantize(CNN, None, QuantConfig(method="rtn", checkpoint_dir=str(folder), latency_rules=False),
                      progress=False)  # five blocks
    assert len(block_files(folder)) == 5
    with pytest.raises(ConfigError, match="config differs") as err:
        onnxflex.quantize(CNN, None, QuantConfig(method="rtn", wbits=6, checkpoint_dir=str(folder)), progress=False)
    assert str(folder) in str(err.value)


def test_checkpoint_dir_must_be_a_string():
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        QuantConfig(checkpoint_dir=3)
