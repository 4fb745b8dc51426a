"""Deployment targets: what each runtime accepts and where Q/DQ go."""
if __name__ != "onnxflex.runtimes":
    raise ImportError(
        f"runtimes/ is installed as 'onnxflex.runtimes' and must be imported under that name, not {__name__!r}; "
        "install the project (pip install -e .) and import onnxflex.runtimes")
