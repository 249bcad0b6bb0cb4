"""load_config: includes, merge, overrides, references, validation, and every error path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dfine.config import ConfigError, apply_override, deep_merge, dump_config, load_config
from dfine.registry import DECODERS

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigTestDecoder:
    """A registered component with known arguments, for validation tests."""

    def __init__(self, num_layers: int = 6, hidden_dim: int = 256, num_classes: int = 80):
        self.num_layers = num_layers


if "ConfigTestDecoder" not in DECODERS:
    DECODERS.register(ConfigTestDecoder)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_nested_relative_includes_merge_in_order(tmp_path):
    write(tmp_path, "base/a.yml", "epochs: 1\nmodel: {type: ConfigTestDecoder, num_layers: 3, hidden_dim: 64}\n")
    write(tmp_path, "base/b.yml", "__include__: [a.yml]\nepochs: 2\nseed: 7\n")
    top = write(tmp_path, "top.yml", "__include__: [base/b.yml]\nmodel: {num_layers: 4}\n")
    cfg = load_config(top)
    assert cfg["epochs"] == 2  # b.yml overrides its include a.yml
    assert cfg["seed"] == 7
    assert cfg["model"] == {"type": "ConfigTestDecoder", "num_layers": 4, "hidden_dim": 64}  # deep merge


def test_lists_are_replaced_not_concatenated():
    merged = deep_merge({"a": [1, 2, 3], "b": {"c": 1, "d": 2}}, {"a": [9], "b": {"d": 5}})
    assert merged == {"a": [9], "b": {"c": 1, "d": 5}}


def test_deep_merge_does_not_share_state_between_loads(tmp_path):
    path = write(tmp_path, "c.yml", "model: {type: ConfigTestDecoder, num_layers: 3}\n")
    first = load_config(path)
    first["model"]["num_layers"] = 99
    assert load_config(path)["model"]["num_layers"] == 3


def test_include_cycle_reports_chain(tmp_path):
    write(tmp_path, "a.yml", "__include__: [b.yml]\n")
    write(tmp_path, "b.yml", "__include__: [a.yml]\n")
    with pytest.raises(ConfigError, match=r"include cycle: .*a\.yml -> .*b\.yml -> .*a\.yml"):
        load_config(tmp_path / "a.yml")


def test_missing_include_reports_chain(tmp_path):
    write(tmp_path, "a.yml", "__include__: [sub/missing.yml]\n")
    with pytest.raises(ConfigError, match=r"not found: .*sub/missing\.yml \(include chain: .*a\.yml -> "):
        load_config(tmp_path / "a.yml")


def test_missing_top_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yml")


def test_bad_yaml_and_non_mapping(tmp_path):
    write(tmp_path, "bad.yml", "epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"cannot parse YAML in .*bad\.yml"):
        load_config(tmp_path / "bad.yml")
    write(tmp_path, "list.yml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yml")
    write(tmp_path, "inc.yml", "__include__: 3\n")
    with pytest.raises(ConfigError, match="must be a list of file paths"):
        load_config(tmp_path / "inc.yml")


def test_scientific_floats_in_files(tmp_path):
    path = write(tmp_path, "c.yml", "clip_max_norm: 1e-1\nseed: 10\n")
    cfg = load_config(path)
    assert cfg["clip_max_norm"] == 0.1 and isinstance(cfg["seed"], int)


def test_unsafe_yaml_tags_are_rejected(tmp_path):
    write(tmp_path, "evil.yml", "epochs: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_config(tmp_path / "evil.yml")


@pytest.mark.parametrize(
    "raw, expected",
    [("3", 3), ("0.5", 0.5), ("true", True), ("null", None), ("[1, 2]", [1, 2]), ("abc", "abc"), ("'3'", "3"),
     ("{a: 1}", {"a": 1}), ("1e-4", 1e-4), ("-2E3", -2000.0), ("1.0e-4", 1.0e-4)],
)
def test_override_values_are_yaml_typed(raw, expected):
    # apply_override alone: the value's YAML type, before load_config checks it against the key's declared type
    # (epochs must be an integer; tests/test_settings.py covers that)
    cfg = {"epochs": 1}
    apply_override(cfg, f"epochs={raw}")
    assert cfg["epochs"] == expected


def test_override_nested_and_list_index(tmp_path):
    path = write(
        tmp_path, "c.yml", "model: {type: ConfigTestDecoder, num_layers: 3}\neval_spatial_size: [640, 640]\n"
    )
    cfg = load_config(path, ["model.num_layers=5", "eval_spatial_size.1=320", "model.hidden_dim=32"])
    assert cfg["model"]["num_layers"] == 5
    assert cfg["model"]["hidden_dim"] == 32  # a constructor argument not written in the file is allowed
    assert cfg["eval_spatial_size"] == [640, 320]


def test_override_unknown_key_suggests_closest(tmp_path):
    path = write(tmp_path, "c.yml", "epochs: 1\nmodel: {type: ConfigTestDecoder, num_layers: 3}\n")
    with pytest.raises(ConfigError, match=r"`epochz` matches no known key \(did you mean `epochs`"):
        load_config(path, ["epochz=3"])
    with pytest.raises(ConfigError, match=r"`model.num_layer` matches no known key \(did you mean `num_layers`"):
        load_config(path, ["model.num_layer=3"])


def test_real_config_suggestion_names_each_key_once():
    # `epochs` is both in the file and a known runtime key: it must be suggested once, not twice
    with pytest.raises(ConfigError, match=r"\(did you mean `epochs`, `stop_epoch`\?\)$"):
        load_config(REPO_ROOT / "configs" / "dfine_n_coco.yml", ["epochz=3"])


def test_override_error_paths(tmp_path):
    path = write(tmp_path, "c.yml", "epochs: 1\neval_spatial_size: [640, 640]\n")
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(path, ["epochs"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(path, ["epochs.x=1"])
    with pytest.raises(ConfigError, match="indexes a list of 2 items"):
        load_config(path, ["eval_spatial_size.5=1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, ["epochs=[1"])


def test_unknown_top_level_key_in_file(tmp_path):
    path = write(tmp_path, "c.yml", "epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown top-level config key `epoch` \(did you mean `epochs`"):
        load_config(path)


def test_unknown_type_and_unknown_argument_name_the_path(tmp_path):
    path = write(tmp_path, "c.yml", "model: {type: ConfigTestDecodr}\n")
    with pytest.raises(ConfigError, match=r"unknown type `ConfigTestDecodr` at `model.type` \(did you mean `ConfigTestDecoder`"):
        load_config(path)
    path = write(tmp_path, "d.yml", "model: {type: ConfigTestDecoder, num_layer: 2}\n")
    with pytest.raises(ConfigError, match=r"`model.num_layer` is not an argument of ConfigTestDecoder \(did you mean `num_layers`"):
        load_config(path)


def test_references_resolve_after_overrides_and_keep_type(tmp_path):
    path = write(
        tmp_path,
        "c.yml",
        """
        num_classes: 80
        eval_spatial_size: [640, 640]
        output_dir: ./output/run_${num_classes}
        model: {type: ConfigTestDecoder, num_classes: "${num_classes}"}
        postprocessor: {size: "${eval_spatial_size}"}
        """,
    )
    cfg = load_config(path, ["num_classes=3"])
    assert cfg["model"]["num_classes"] == 3
    assert cfg["postprocessor"]["size"] == [640, 640]
    assert cfg["output_dir"] == "./output/run_3"


def test_reference_errors(tmp_path):
    path = write(tmp_path, "c.yml", "num_classes: 80\nmodel: {type: ConfigTestDecoder, num_classes: '${num_clases}'}\n")
    with pytest.raises(ConfigError, match=r"`model.num_classes` refers to \$\{num_clases\}.*did you mean `num_classes`"):
        load_config(path)
    path = write(tmp_path, "d.yml", "seed: '${epochs}'\nepochs: '${seed}'\n")
    with pytest.raises(ConfigError, match="reference cycle"):
        load_config(path)


def test_dump_round_trips(tmp_path):
    path = write(tmp_path, "c.yml", "epochs: 3\nmodel: {type: ConfigTestDecoder, num_layers: 2}\n")
    cfg = load_config(path)
    dumped = dump_config(cfg, tmp_path / "out" / "config.yml")
    assert load_config(dumped) == cfg


def test_apply_override_in_place():
    cfg = {"epochs": 1}
    apply_override(cfg, "epochs=5")
    assert cfg == {"epochs": 5}


def run_train(*args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "train.py"), *args],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )


def test_train_print_config_with_override():
    result = run_train("-c", "configs/dfine_n_coco.yml", "--print-config", "-u", "epochs=3")
    assert result.returncode == 0, result.stderr
    import yaml

    assert yaml.safe_load(result.stdout)["epochs"] == 3


def test_train_rejects_typo_override():
    result = run_train("-c", "configs/dfine_n_coco.yml", "--print-config", "-u", "epochz=3")
    assert result.returncode != 0
    assert "epochz" in result.stderr and "epochs" in result.stderr
    assert "Traceback" not in result.stderr


def test_fresh_process_override_of_an_argument_the_file_leaves_at_its_default():
    # dfine_s_coco.yml does not write the decoder's dim_feedforward (the class default 1024 applies); a fresh
    # process has not imported the components yet, and the override must still be recognised.
    result = run_train("-c", "configs/dfine_s_coco.yml", "--print-config", "-u", "model.decoder.dim_feedforward=512")
    assert result.returncode == 0, result.stderr
    import yaml

    assert yaml.safe_load(result.stdout)["model"]["decoder"]["dim_feedforward"] == 512
