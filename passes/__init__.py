"""Graph passes (canonicalize, fold BatchNorm, ...) and the planning functions after them: select
quantizable layers, partition into blocks (these read the model and return a plan; they are not Pass)."""
if __name__ != "onnxflex.passes":
    raise ImportError(
        f"passes/ is installed as 'onnxflex.passes' and must be imported under that name, not {__name__!r}; "
        "install the project (pip install -e .) and import onnxflex.passes")
