"""Every tool, driven through a table of everyday mistakes: each must end with exit status 2 (or the documented one),
one ``error:`` line naming the key, path or value at fault, no traceback, and nothing written or changed on disk.

The tools' ``main(argv)`` run in-process (fast); two subprocess runs check the same from a shell, end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dfine
import dfine.devices
from dfine.cli import benchmark, check_dataset, convert, eval as eval_cli, export_onnx, infer, train

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "dfine_n_demo.yml")

TOOLS = {
    "train": train.main, "eval": eval_cli.main, "infer": infer.main, "export_onnx": export_onnx.main,
    "benchmark": benchmark.main, "convert": convert.main, "check_dataset": check_dataset.main,
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder holding the files the table refers to; the tools run with it as the current directory.
    No CUDA and no MPS, whatever the machine has, so device mistakes are mistakes everywhere."""
    (tmp_path / "blocker").write_text("a file where a folder would have to be created\n")
    (tmp_path / "garbage.pth").write_bytes(b"<html>404 not found</html>")
    torch.save({"model": {}}, tmp_path / "empty.pth")  # a readable checkpoint: the tools must stop before loading it
    gpu_run = dfine.load_config(DEMO, ["device=cuda"])  # as a GPU training run stores it
    torch.save({"model": {}, "config": gpu_run}, tmp_path / "gpu_run.pth")
    whole = (tmp_path / "empty.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "image.jpg").write_bytes(b"not decoded: the arguments fail first")
    (tmp_path / "model.onnx").write_bytes(b"not read: the arguments fail first")
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad_yaml.yml").write_text("epochs: [1, 2\n")
    (tmp_path / "a_list.yml").write_text("- epochs\n- 3\n")
    (tmp_path / "typo_key.yml").write_text(f"__include__: [{DEMO}]\nepoch: 3\n")
    (tmp_path / "typed_in_file.yml").write_text(f"__include__: [{DEMO}]\nuse_amp: sometimes\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(dfine.devices, "has_mps", lambda: False)
    return tmp_path


# (tool, argv, words the message must contain, exit status)
CASES = [
    # typed config values (the list), from -u and from a file, also with --print-config
    ("train", ["-c", DEMO, "-u", "epochs=many"], ["epochs", "'many'", "integer"], 2),
    ("train", ["-c", DEMO, "--print-config", "-u", "epochs=many"], ["epochs", "'many'"], 2),
    ("train", ["-c", DEMO, "-u", "optimizer.lr=-1"], ["optimizer.lr", "-1", "> 0"], 2),
    ("train", ["-c", DEMO, "-u", "num_classes=0"], ["num_classes", "0", ">= 1"], 2),
    ("train", ["-c", DEMO, "-u", "eval_spatial_size=[640]"], ["eval_spatial_size", "[640]"], 2),
    ("train", ["-c", DEMO, "-u", "eval_spatial_size=[300,300]"], ["eval_spatial_size", "multiples of 32"], 2),
    ("train", ["-c", DEMO, "-u", "train_dataloader.total_batch_size=0"], ["train_dataloader.total_batch_size", "0"], 2),
    ("train", ["-c", DEMO, "-u", "amp_dtype=float8"], ["amp_dtype", "'float8'", "bfloat16"], 2),
    ("train", ["-c", DEMO, "-u", "use_ema=maybe"], ["use_ema", "'maybe'", "true or false"], 2),
    ("train", ["-c", DEMO, "-u", "stop_epoch=-3"], ["stop_epoch", "-3"], 2),
    ("train", ["-c", DEMO, "-u", "model.decoder.num_queries=lots"], ["model.decoder.num_queries", "'lots'", "int"], 2),
    ("train", ["-c", DEMO, "-u", "model.encoder.dropout=true"], ["model.encoder.dropout", "float"], 2),
    ("train", ["-c", "typed_in_file.yml"], ["use_amp", "'sometimes'"], 2),
    ("train", ["-c", "typo_key.yml"], ["epoch", "did you mean"], 2),
    ("train", ["-c", "bad_yaml.yml"], ["bad_yaml.yml", "YAML"], 2),
    ("train", ["-c", "a_list.yml"], ["a_list.yml", "mapping"], 2),
    ("train", ["-c", "missing.yml"], ["missing.yml", "not found"], 2),
    # devices
    ("train", ["-c", DEMO, "-d", "cuda"], ["cuda", "CUDA is not available", "cpu"], 2),
    ("train", ["-c", DEMO, "-d", "mps"], ["mps", "Apple", "cpu"], 2),
    ("train", ["-c", DEMO, "-d", "gpu"], ["device", "'gpu'"], 2),
    ("infer", ["-r", "empty.pth", "-i", "image.jpg", "-d", "cuda:1"], ["cuda:1", "cpu"], 2),
    ("benchmark", ["eval", "-c", DEMO, "-d", "cuda"], ["-d cuda", "cpu"], 2),
    # paths
    ("train", ["-c", DEMO, "--output-dir", "blocker/run"], ["--output-dir", "blocker"], 2),
    ("train", ["-c", DEMO, "-r", "missing.pth"], ["-r", "missing.pth", "no such file"], 2),
    ("train", ["-c", DEMO, "-t", "garbage.pth"], ["-t", "garbage.pth", "not a PyTorch checkpoint"], 2),
    ("eval", ["-r", "missing.pth"], ["missing.pth"], 2),
    ("eval", ["-r", "truncated.pth"], ["truncated.pth", "not a PyTorch checkpoint"], 2),
    ("eval", ["-r", "garbage.pth", "-c", DEMO], ["garbage.pth"], 2),
    ("eval", ["-r", "empty.pth", "-c", DEMO, "--output-dir", "blocker/eval"], ["--output-dir", "blocker"], 2),
    ("eval", ["-r", "folder"], ["-r", "folder", "not a file"], 2),
    ("eval", ["-r", "gpu_run.pth"], ["no -d given", "cuda", "CUDA is not available", "cpu"], 2),
    ("infer", ["-r", "model.onnx", "-c", "garbage.pth", "-i", "image.jpg"], ["-c", "garbage.pth"], 2),
    ("infer", ["-r", "empty.pth", "-i", "image.jpg", "--threshold", "-0.5"], ["--threshold", "-0.5", "[0, 1]"], 2),
    ("infer", ["-r", "empty.pth", "-i", "image.jpg", "--threshold", "1.5"], ["--threshold", "1.5"], 2),
    ("infer", ["-r", "empty.pth", "-i", "no_such_dir"], ["-i", "no_such_dir", "no such file or folder"], 2),
    ("infer", ["-r", "empty.pth", "-i", "notes.txt"], ["-i", "notes.txt", ".jpg"], 2),
    ("infer", ["-r", "empty.pth", "-i", "image.jpg", "--batch-size", "0"], ["--batch-size", "0"], 2),
    ("infer", ["-r", "empty.pth", "-i", "image.jpg", "--size", "300", "320"], ["--size", "300", "multiples of 32"], 2),
    ("infer", ["-r", "empty.pth", "-i", "folder", "-o", "blocker/out"], ["-o", "blocker"], 2),
    ("infer", ["-r", "empty.pth", "-i", "image.jpg", "--channels-last", "--no-deploy"], ["--channels-last", "--no-deploy"], 2),
    ("infer", ["-r", "model.onnx", "-i", "image.jpg", "--channels-last"], ["--channels-last", "model.onnx", "checkpoints"], 2),
    ("export_onnx", ["-r", "empty.pth", "-o", "blocker/sub/model.onnx"], ["-o", "blocker", "cannot be created"], 2),
    ("export_onnx", ["-r", "empty.pth", "-o", "folder"], ["-o", "folder", "is a folder"], 2),
    ("export_onnx", ["-r", "empty.pth", "--opset", "9"], ["--opset", "9", "[16, 20]"], 2),
    ("export_onnx", ["-r", "empty.pth", "--batch-size", "0"], ["--batch-size", "0"], 2),
    ("export_onnx", ["-r", "empty.pth", "--images", "missing.jpg"], ["--images", "missing.jpg"], 2),
    ("export_onnx", ["-r", "empty.pth", "--check-ap", "--max-images", "0"], ["--max-images", "0"], 2),
    ("export_onnx", ["-o", "x.onnx"], ["-r", "-c"], 2),
    ("benchmark", ["eval", "-c", DEMO, "--size", "100"], ["--size", "100", "multiples of 32"], 2),
    ("benchmark", ["train", "-c", DEMO, "--batch-size", "0"], ["--batch-size", "0"], 2),
    ("benchmark", ["eval", "-c", DEMO, "--runs", "0"], ["--runs", "0"], 2),
    ("benchmark", ["eval", "-c", DEMO, "--json", "blocker/b.json"], ["--json", "blocker"], 2),
    ("benchmark", ["eval", "-c", DEMO, "-u", "epochs=many"], ["epochs", "'many'"], 2),
    ("benchmark", ["model", "-c", DEMO, "--profile"], ["--profile", "'model'", "train and eval"], 2),
    ("benchmark", ["train", "-c", DEMO, "--channels-last"], ["--channels-last", "'train'", "eval mode"], 2),
    ("convert", ["--from-hf", "no_such_dir", "-o", "x.pth"], ["--from-hf", "no_such_dir"], 2),
    ("convert", ["--to-hf", "-r", "missing.pth", "-o", "hf"], ["-r", "missing.pth"], 2),
    ("convert", ["--to-hf", "-r", "empty.pth", "-o", "blocker/hf"], ["-o", "blocker"], 2),
    ("convert", ["--from-hf", "folder", "-o", "folder"], ["-o", "folder", "is a folder"], 2),
    ("check_dataset", ["--ann-file", "folder", "--img-folder", "folder"], ["--ann-file", "folder", "not a file"], 2),
    ("check_dataset", ["--ann-file", "x.json", "--img-folder", "image.jpg"], ["--img-folder", "image.jpg"], 2),
    ("check_dataset", ["--ann-file", "x.json", "--img-folder", "folder", "--num-classes", "0"], ["--num-classes", "0"], 2),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.stat()
            out[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return out


@pytest.mark.parametrize("tool, argv, words, status", CASES, ids=[f"{c[0]} {' '.join('demo.yml' if a == DEMO else a for a in c[1])}" for c in CASES])
def test_mistake_gives_one_error_line(workdir, capsys, tool, argv, words, status):
    before, repo_before = snapshot(workdir), snapshot(REPO / "configs")
    code = TOOLS[tool](argv)
    out, err = capsys.readouterr()
    assert code == status, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert out == ""  # --print-config printed nothing either
    assert snapshot(workdir) == before
    assert snapshot(REPO / "configs") == repo_before


def test_cuda_index_beyond_the_machine(workdir, capsys, monkeypatch):
    """cuda:3 on a one-GPU machine lists the devices that exist (the check needs no real GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    before = snapshot(workdir)
    assert train.main(["-c", DEMO, "-d", "cuda:3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: -d cuda:3:") and "1 CUDA device" in err and "cpu, cuda:0" in err, err
    assert snapshot(workdir) == before


def test_fp16_amp_on_cpu_is_explained(workdir, capsys, monkeypatch):
    """--use-amp with amp_dtype float16 on the CPU: a warning says why and what to set; the run goes on."""
    import dfine.engine.trainer as trainer

    seen = {}

    def fake_run(cfg, resume=None, test_only=False):  # stands in for the training itself
        seen["cfg"] = cfg
        return 0

    monkeypatch.setattr(trainer, "run", fake_run)
    assert train.main(["-c", DEMO, "-d", "cpu", "--use-amp", "-u", "amp_dtype=float16"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "float16" in err and "amp_dtype=bfloat16" in err
    assert seen["cfg"]["use_amp"] is True
    # bfloat16 (the CPU default) needs no explanation
    assert train.main(["-c", DEMO, "-d", "cpu", "--use-amp", "-u", "amp_dtype=bfloat16"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_internal_errors_keep_their_traceback(monkeypatch):
    """run_tool turns only user errors into one line: a bug still raises."""
    from dfine.cli.common import run_tool
    from dfine.errors import UsageError

    @run_tool
    def buggy(argv=None):
        raise KeyError("a bug")

    @run_tool
    def misused(argv=None):
        raise UsageError("--x 3: expected a value in [0, 1]")

    with pytest.raises(KeyError):
        buggy([])
    assert misused([]) == 2


def test_from_a_shell(tmp_path):
    """End to end through the launchers: exit status 2, one line on stderr, no traceback, nothing written."""
    (tmp_path / "blocker").write_text("x")
    torch.save({"model": {}}, tmp_path / "empty.pth")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [
        ([str(REPO / "tools" / "train.py"), "-c", DEMO, "-u", "epochs=many"], "epochs: expected an integer >= 1, got 'many'"),
        ([str(REPO / "tools" / "export_onnx.py"), "-r", "empty.pth", "-o", "blocker/m.onnx"], "-o blocker/m.onnx"),
    ]
    before = snapshot(tmp_path)
    procs = [subprocess.Popen([sys.executable, *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv, _ in runs]
    for proc, (_, expected) in zip(procs, runs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert "Traceback" not in err and err.strip().count("\n") == 0 and expected in err, err
    assert snapshot(tmp_path) == before
