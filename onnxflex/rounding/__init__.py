"""The torch side: op converters, rounders, activation quantizers and block reconstruction.

Importing this package imports torch; the rest of onnxflex imports it only when it needs it.
"""
