"""Build the zoo's sentence-embedding encoder: a Hugging Face BERT (random init, no download) with mean
pooling over the attention mask and L2 normalisation, exported by torch.onnx's dynamo path
(dynamo=True, onnxscript) as sentence-transformers users export it. The export carries ReduceL2 (or
its Sqrt/ReduceSum form), Expand/Where over the mask and the dynamo exporter's own naming.

Writes tests/zoo/dynamo_sentence_encoder.onnx and tests/zoo/encoder.json (format in tests/zoo_models.py).

Rerun (exporters live outside the project venv; never install torchvision)::

    python3 -m venv /tmp/exp
    /tmp/exp/bin/pip install torch==2.13.0
    /tmp/exp/bin/pip install transformers onnxscript onnx onnxruntime
    /tmp/exp/bin/python tests/zoo/make_torch_encoder.py

Versions used for the committed file: torch 2.13.0+cpu, transformers 5.24.0, onnxscript 0.7.2,
onnx 1.23.2.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ZOO = Path(__file__).parent
SEQ, VOCAB = 16, 1000


class SentenceEncoder(nn.Module):
    """BERT → masked mean over tokens → L2-normalised sentence embedding."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=64)
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids, attention_mask):
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, p=2, dim=1)


def main() -> None:
    import onnx

    torch.manual_seed(0)
    model = SentenceEncoder().eval()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.int64)
    path = ZOO / "dynamo_sentence_encoder.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(model, (ids, mask), str(path), dynamo=True, input_names=["input_ids", "attention_mask"],
                      output_names=["sentence_embedding"], opset_version=18, external_data=False,
                      dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}})
    onnx.checker.check_model(str(path))
    ops = sorted({n.op_type for n in onnx.load(str(path)).graph.node})
    entry = {
        "name": "dynamo_sentence_encoder", "file": path.name, "script": Path(__file__).name, "transformer": True,
        "exporter": f"torch.onnx {torch.__version__.split('+')[0]} (dynamo=True, onnxscript, opset 18)",
        "inputs": {"input_ids": {"kind": "tokens", "shape": [SEQ], "high": VOCAB, "dtype": "int64"},
                   "attention_mask": {"kind": "ones", "shape": [SEQ], "dtype": "int64"}},
        "notes": "sentence-embedding encoder: BertModel random init (hidden 64, 2 layers, 2 heads, vocab 1000), "
                 f"masked mean pooling, L2 normalize; batch dynamic, sequence {SEQ}; ops: {', '.join(ops)}",
    }
    (ZOO / "encoder.json").write_text(json.dumps({"models": [entry]}, indent=1) + "\n")
    print(path, path.stat().st_size, "bytes; ops:", ", ".join(ops))


if __name__ == "__main__":
    main()
