"""The command-line programs, one module each with a ``main(argv) -> exit code``: train, eval, infer, export_onnx,
benchmark, convert, check_dataset. ``tools/*.py`` are thin launchers for them; ``__main__.py`` is the installed
``dfine`` command that dispatches to them (``dfine train|eval|predict|export|convert|check-data|benchmark``)."""
