"""tools/benchmark.py --profile: the torch.profiler tables of a train step and an eval forward."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dfine.cli import benchmark

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "dfine_n_demo.yml")


def _profile(capsys, tmp_path, mode: str) -> str:
    argv = [mode, "-c", DEMO, "--size", "160", "--warmup", "0", "--runs", "1", "--threads", "1", "--profile",
            "--profile-rows", "5", "--json", str(tmp_path / "bench.json")]
    assert benchmark.main(argv) == 0
    return capsys.readouterr().out


def test_train_profile_prints_forward_backward_and_step_tables(capsys, tmp_path):
    out = _profile(capsys, tmp_path, "train")
    sections = re.split(r"\nprofile: ", out)[1:]
    names = [s.split(" (top", 1)[0] for s in sections]
    assert names == ["forward + criterion", "backward", "clip + optimizer step"]
    for section in sections:
        op_rows = [line for line in section.splitlines() if re.match(r"\s*\S+::\S+", line)]
        assert 1 <= len(op_rows) <= 5  # --profile-rows caps each table
    # the backward table holds backward kernels (which ones lead depends on the machine), the forward table none
    assert re.search(r"aten::\S*_backward", sections[1])
    assert "_backward" not in sections[0]
    assert "profile" not in (tmp_path / "bench.json").read_text()  # tables go to stdout, not into the JSON


def test_eval_profile_prints_one_table(capsys, tmp_path):
    out = _profile(capsys, tmp_path, "eval")
    assert out.count("\nprofile: ") == 1 and "profile: eval forward" in out
    assert "aten::" in out and "backward" not in out


def test_eval_channels_last_and_model_mode_time_the_deploy_form_run_nhwc(capsys, tmp_path):
    common = ["-c", DEMO, "--size", "160", "--warmup", "0", "--runs", "1", "--threads", "1"]
    assert benchmark.main(["eval", *common, "--channels-last", "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["form"] == "deploy, channels-last"
    assert benchmark.main(["model", *common, "--no-compile", "--no-onnx", "--json", str(tmp_path / "model.json")]) == 0
    latency = json.loads((tmp_path / "model.json").read_text())["eval_latency_s"]
    assert set(latency) == {"eager", "deploy channels-last"} and all(v > 0 for v in latency.values())
    assert re.search(r"eval deploy channels-last \(s\)\s+\d+\.\d{4}", capsys.readouterr().out)
