"""The command-line programs, one module each with a ``main(argv) -> exit code``. ``tools/*.py`` are thin
launchers for them.

    train.py, eval.py, infer.py, export_onnx.py, benchmark.py, convert.py, check_dataset.py
"""
