"""Graph passes: canonicalize, fold BatchNorm, select quantizable layers, partition into blocks."""
if __name__ != "onnxflex.passes":
    raise ImportError(
        f"passes/ is installed as 'onnxflex.passes' and must be imported under that name, not {__name__!r}; "
        "install the project (pip install -e .) and import onnxflex.passes")
