"""Released weights by name (dfine/weights.py), offline: a local HTTP server on 127.0.0.1 serves small
checkpoints through the same download code the real URLs use."""

from __future__ import annotations

import dataclasses
import http.server
import threading
from pathlib import Path

import pytest
import torch

import dfine
import dfine.weights as weights
from dfine.models.backbones.hgnetv2 import HGNetV2, PretrainedWeightsError
from dfine.weights import WEIGHTS, WeightsError, fetch

FILE = WEIGHTS["hgnetv2_b0"].file_name  # PPHGNetV2_B0_stage1.pth


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; /truncated/<file> announces the full length but closes after half of it."""

    requests: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.path.startswith("/truncated/"):
            data = (Path(self.directory) / self.path.split("/")[-1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, served folder) with FILE = a B0 state dict and wrong/FILE = a B1 one under B0's name."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    torch.save(HGNetV2("B0", pretrained=False, freeze_norm=False).state_dict(), root / FILE)
    (root / "wrong").mkdir()
    torch.save(HGNetV2("B1", pretrained=False, freeze_norm=False).state_dict(), root / "wrong" / FILE)
    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def _entry(url: str, sha256: str | None = None):
    return dataclasses.replace(WEIGHTS["hgnetv2_b0"], url=url, sha256=sha256)


def test_download_progress_cache_hit_and_checksum(server, tmp_path, capsys):
    base, root = server
    import hashlib

    digest = hashlib.sha256((root / FILE).read_bytes()).hexdigest()
    _Handler.requests.clear()
    path = fetch(_entry(f"{base}/{FILE}", digest), tmp_path / "cache")
    assert path == tmp_path / "cache" / FILE and path.read_bytes() == (root / FILE).read_bytes()
    err = capsys.readouterr().err
    assert "hgnetv2_b0" in err and "100%" in err  # the tqdm progress bar
    assert fetch(_entry(f"{base}/{FILE}", digest), tmp_path / "cache") == path
    assert _Handler.requests == [f"/{FILE}"]  # the second call was a cache hit


def test_checksum_mismatch_keeps_nothing(server, tmp_path):
    base, _ = server
    with pytest.raises(WeightsError, match="checksum mismatch") as info:
        fetch(_entry(f"{base}/{FILE}", "0" * 64), tmp_path / "cache", progress=False)
    assert "\n" not in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_interrupted_download_leaves_no_partial_file(server, tmp_path):
    base, _ = server
    with pytest.raises(WeightsError, match="interrupted") as info:
        fetch(_entry(f"{base}/truncated/{FILE}"), tmp_path / "cache", progress=False)
    assert str(tmp_path / "cache" / FILE) in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_wrong_model_refused_with_the_mismatch_named(server, tmp_path):
    base, _ = server
    with pytest.raises(WeightsError, match=r"is not a hgnetv2_b0 checkpoint: stem\.stem1\.conv\.weight: file \[24, 3, 3, 3\] vs hgnetv2_b0 \[16, 3, 3, 3\]"):
        fetch(_entry(f"{base}/wrong/{FILE}"), tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_one_line_with_url_and_path(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{FILE}"
    with pytest.raises(WeightsError) as info:
        fetch(_entry(url), tmp_path / "cache", progress=False)
    message = str(info.value)
    assert "\n" not in message and url in message and f"put it at {tmp_path / 'cache' / FILE}" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_by_name_everywhere(server, tmp_path, monkeypatch):
    """dfine.load_pretrained(model, NAME) and the backbone's `pretrained: true` go through the same cache."""
    base, root = server
    monkeypatch.setenv("DFINE_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(weights.WEIGHTS, "hgnetv2_b0", _entry(f"{base}/{FILE}"))
    model = HGNetV2("B0", pretrained=False, freeze_norm=False)
    report = dfine.load_pretrained(model, "hgnetv2_b0")
    assert report.ok and (tmp_path / "home" / "weights" / FILE).is_file()
    served = torch.load(root / FILE, weights_only=True)
    assert all(torch.equal(v, served[k]) for k, v in model.state_dict().items())
    backbone = HGNetV2("B0", pretrained=True, local_model_dir=str(tmp_path / "nothing_here"))
    assert torch.equal(backbone.stem.stem1.conv.weight, served["stem.stem1.conv.weight"])
    monkeypatch.setitem(weights.WEIGHTS, "hgnetv2_b0", _entry(f"{base}/missing/{FILE}"))
    (tmp_path / "home" / "weights" / FILE).unlink()
    with pytest.raises(PretrainedWeightsError, match="put it at"):
        HGNetV2("B0", pretrained=True, local_model_dir=str(tmp_path / "nothing_here"))
    with pytest.raises(WeightsError, match="did you mean"):
        dfine.load_pretrained(model, "hgnetv2_b9")


def test_table_covers_every_release():
    names = set(WEIGHTS)
    assert {f"dfine_{s}_coco" for s in "nsmlx"} <= names
    assert {f"dfine_{s}_{d}" for s in "smlx" for d in ("obj365", "obj2coco")} <= names
    assert {f"rtdetrv2_r{d}vd_coco" for d in (18, 34, 50, 101)} <= names
    assert {f"hgnetv2_b{i}" for i in range(7)} <= names
    for entry in WEIGHTS.values():
        assert entry.url.startswith("https://github.com/") and entry.url.endswith(".pth")
        if entry.kind == "detector":
            assert entry.config_path() is not None, entry.name  # the config the shapes are checked against


def test_reference_state_dict_passes_the_shape_check():
    """The reference's own D-FINE-N state dict (../shared/reference) fits the shapes named by dfine_n_coco, and is
    refused as dfine_s_coco."""
    from helpers import REFERENCE_DIR

    path = REFERENCE_DIR / "dfine_n_random.pth"
    if not path.is_file():
        pytest.skip(f"reference file {path} not found (../shared/reference beside the repo)")
    weights.verify_shapes(WEIGHTS["dfine_n_coco"], path)
    with pytest.raises(WeightsError, match="is not a dfine_s_coco checkpoint: decoder"):
        weights.verify_shapes(WEIGHTS["dfine_s_coco"], path)


def test_eval_and_tuning_from_a_released_name(tmp_path, monkeypatch):
    """`tools/eval.py -r NAME -c CONFIG` and `-t NAME` (load_for_tuning) fetch the release through the cache."""
    from dfine.cli import eval as eval_tool
    from dfine.engine.checkpointing import load_for_tuning
    from helpers import DEMO_CONFIG, make_demo_checkpoint

    release = make_demo_checkpoint(tmp_path / "dfine_demo_release.pth", (64, 64))
    entry = weights.WeightsEntry("demo_release", release.as_uri(), "detector", DEMO_CONFIG.name, "coco")
    monkeypatch.setitem(weights.WEIGHTS, "demo_release", entry)
    monkeypatch.setenv("DFINE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DFINE_CACHE", str(tmp_path / "cache"))
    code = eval_tool.main([
        "-r", "demo_release", "-c", str(DEMO_CONFIG), "--output-dir", str(tmp_path / "eval"), "-u",
        "eval_spatial_size=[64, 64]", "val_dataloader.dataset.num_images=4", "val_dataloader.dataset.image_size=64",
        "val_dataloader.num_workers=0", "device=cpu", "model.decoder.num_queries=20", "postprocessor.num_top_queries=20",
    ])
    assert code == 0 and (tmp_path / "eval" / "eval_metrics.json").is_file()
    assert (tmp_path / "home" / "weights" / release.name).is_file()
    cfg = dfine.load_config(DEMO_CONFIG, ["eval_spatial_size=[64, 64]"])
    model = dfine.build_model(cfg, load_pretrained=False)
    report = load_for_tuning(model, "demo_release")
    assert not report.mismatched and not report.missing
