"""Streaming voice-activity detector shaped like real streaming exports, for make_torch_zoo.py.

One call consumes a 576-sample chunk (512 new + 64 context) and the recurrent state, and returns the
speech probability and the new state. The front end is picked by an ``If`` on the 0-d int64 sample
rate (16 kHz or 8 kHz branch, each with its own Conv weights inside the branch), as the real model
is exported. The module is torch.jit.script-ed so that the tensor condition becomes an ONNX If, then
written by torch.onnx's TorchScript path (dynamo=False). Run through make_torch_zoo.py.
"""
from __future__ import annotations

import torch
from torch import nn

from make_torch_zoo import TORCH, ZOO, _entry, _seed

HIDDEN = 128


class FrontEnd(nn.Module):
    """Framed conv filterbank: [N, 576] → [N, 64, frames] → pooled [N, HIDDEN]."""

    def __init__(self, win: int, hop: int):
        super().__init__()
        self.stft = nn.Conv1d(1, 64, win, hop, bias=False)
        self.enc = nn.Sequential(nn.Conv1d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv1d(64, HIDDEN, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.stft(x.unsqueeze(1))
        real, imag = spec[:, :32], spec[:, 32:]
        mag = torch.sqrt(real * real + imag * imag + 1e-6)
        return self.enc(mag).mean(2)


class Vad(nn.Module):
    def __init__(self, cell: str):
        super().__init__()
        self.cell = cell
        self.fe16, self.fe8 = FrontEnd(128, 64), FrontEnd(64, 32)
        if cell == "lstm":
            self.rnn = nn.LSTM(HIDDEN, HIDDEN)
        else:
            self.rnn = nn.GRU(HIDDEN, HIDDEN, num_layers=2)
        self.out = nn.Linear(HIDDEN, 1)


class VadLstm(Vad):
    def __init__(self):
        super().__init__("lstm")

    def forward(self, x: torch.Tensor, state: torch.Tensor, sr: torch.Tensor):
        if bool(sr == 16000):
            feat = self.fe16(x)
        else:
            feat = self.fe8(x)
        y, (h, c) = self.rnn(feat.unsqueeze(0), (state[0:1], state[1:2]))
        return torch.sigmoid(self.out(torch.relu(y[0]))), torch.cat([h, c], 0)


class VadGru(Vad):
    def __init__(self):
        super().__init__("gru")

    def forward(self, x: torch.Tensor, state: torch.Tensor, sr: torch.Tensor):
        if bool(sr == 16000):
            feat = self.fe16(x)
        else:
            feat = self.fe8(x)
        y, h = self.rnn(feat.unsqueeze(0), state)
        return torch.sigmoid(self.out(torch.relu(y[0]))), h


def make_vad(cell: str) -> dict:
    """Export the LSTM (``vad_stream``) or two-layer GRU (``vad_stream_gru``) variant; return its manifest entry."""
    _seed()
    name = "vad_stream" if cell == "lstm" else "vad_stream_gru"
    # frozen, as streaming models are shipped: each branch's weights become constants inside that branch
    model = torch.jit.freeze(torch.jit.script((VadLstm if cell == "lstm" else VadGru)().eval()))
    args = (torch.randn(1, 576), torch.zeros(2, 1, HIDDEN), torch.tensor(16000, dtype=torch.int64))
    torch.onnx.export(model, args, ZOO / f"{name}.onnx", dynamo=False, opset_version=16,
                      input_names=["input", "state", "sr"], output_names=["output", "stateN"],
                      dynamic_axes={"input": {0: "batch"}, "state": {1: "batch"}, "output": {0: "batch"},
                                    "stateN": {1: "batch"}})
    rnn = "LSTM (state = h, c)" if cell == "lstm" else "two GRU layers (state = h of each)"
    return _entry(name, f"{TORCH} (TorchScript of torch.jit.script, dynamo=False, opset 16)", {
        "input": {"kind": "normal", "shape": [576], "scale": 0.1},
        "state": {"kind": "normal", "shape": [2, HIDDEN], "scale": 0.1, "batch_axis": 1},
        "sr": {"kind": "fixed", "value": 16000, "dtype": "int64"}},
        f"streaming VAD: If on the 0-d int64 sr picks a 16 kHz or 8 kHz conv front end (weights inside the "
        f"branches as Constant nodes: the module is frozen, no initializers), then {rnn} reads state[2, N, 128] and writes it back; output prob [N, 1]",
        fix_inputs={"sr": 16000})
