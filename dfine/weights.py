"""Released weights by name: the one table of official checkpoints, and the download cache they go through.

    path = dfine.weights.fetch("dfine_s_obj365")     # downloaded once into $DFINE_HOME/weights (~/.cache/dfine)
    dfine.load_pretrained(model, "dfine_n_coco")      # the same, then loaded into a model
    python tools/train.py -c configs/dfine_s_custom.yml -t dfine_s_obj2coco -u data=/data/mine
    python tools/eval.py -r dfine_n_coco -c configs/dfine_n_coco.yml

Facts (names, URLs) come from the reference READMEs: D-FINE (Peterande/D-FINE, model zoo tables), RT-DETRv2
(lyuwenyu/RT-DETR rtdetrv2_pytorch/README.md) and the HGNetV2 / PResNet ImageNet weights their backbones download.
No checksum is published for any of them; ``sha256`` is checked where an entry has one.

A download goes to a temporary file in the cache folder, renamed only when complete and checked: the checksum
when known, and always the shapes of the named model's state dict (a file of another model is refused and
deleted, naming the tensor that does not fit). Offline: one error with the URL and the exact path to put the
file at by hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from dfine.checkpoint import RECOMPUTED_BUFFERS, CheckpointError, extract_state_dict, load_checkpoint, read_checkpoint

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DFINE_RELEASE = "https://github.com/Peterande/storage/releases/download/dfinev1.0/"
RTDETR_RELEASE = "https://github.com/lyuwenyu/storage/releases/download/v0.1/"
CHUNK = 1 << 20


class WeightsError(CheckpointError):
    """Released weights that cannot be downloaded, or whose file is not what the name promises."""


@dataclass(frozen=True)
class WeightsEntry:
    """One released file. ``kind``: 'detector' (``config`` is the matching file in configs/) or 'backbone'
    (``config`` is the architecture: 'hgnetv2:B0', 'presnet:18'). ``classes``: 'coco' (80 labels, COCO's
    category map) or 'obj365' (366 labels, label = Objects365 category id); None for backbones."""

    name: str
    url: str
    kind: str
    config: str
    classes: str | None = None
    sha256: str | None = None

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def config_path(self) -> Path | None:
        path = CONFIG_DIR / self.config
        return path if self.kind == "detector" and path.is_file() else None


def _table() -> dict[str, WeightsEntry]:
    entries = []
    for size in "nsmlx":
        entries.append(WeightsEntry(f"dfine_{size}_coco", f"{DFINE_RELEASE}dfine_{size}_coco.pth", "detector",
                                    f"dfine_{size}_coco.yml", "coco"))
    for size in "smlx":
        file = "dfine_l_obj2coco_e25.pth" if size == "l" else f"dfine_{size}_obj2coco.pth"  # as released
        entries.append(WeightsEntry(f"dfine_{size}_obj2coco", DFINE_RELEASE + file, "detector",
                                    f"dfine_{size}_obj2coco.yml", "coco"))
        entries.append(WeightsEntry(f"dfine_{size}_obj365", f"{DFINE_RELEASE}dfine_{size}_obj365.pth", "detector",
                                    f"dfine_{size}_obj365.yml", "obj365"))
    entries.append(WeightsEntry("dfine_l_obj365_e25", f"{DFINE_RELEASE}dfine_l_obj365_e25.pth", "detector",
                                "dfine_l_obj365.yml", "obj365"))
    for depth, file in ((18, "rtdetrv2_r18vd_120e_coco.pth"), (34, "rtdetrv2_r34vd_120e_coco_ema.pth"),
                        (50, "rtdetrv2_r50vd_6x_coco_ema.pth"), (101, "rtdetrv2_r101vd_6x_coco_from_paddle.pth")):
        entries.append(WeightsEntry(f"rtdetrv2_r{depth}vd_coco", RTDETR_RELEASE + file, "detector",
                                    f"rtdetrv2_r{depth}vd_coco.yml", "coco"))
    for variant in ("B0", "B1", "B2", "B3", "B4", "B5", "B6"):
        entries.append(WeightsEntry(f"hgnetv2_{variant.lower()}", f"{DFINE_RELEASE}PPHGNetV2_{variant}_stage1.pth",
                                    "backbone", f"hgnetv2:{variant}"))
    for depth, file in ((18, "ResNet18_vd_pretrained_from_paddle.pth"), (34, "ResNet34_vd_pretrained_from_paddle.pth"),
                        (50, "ResNet50_vd_ssld_v2_pretrained_from_paddle.pth"),
                        (101, "ResNet101_vd_ssld_pretrained_from_paddle.pth")):
        entries.append(WeightsEntry(f"presnet{depth}vd", RTDETR_RELEASE + file, "backbone", f"presnet:{depth}"))
    return {e.name: e for e in entries}


WEIGHTS: dict[str, WeightsEntry] = _table()


def weights_dir() -> Path:
    """``$DFINE_HOME/weights``, default ``~/.cache/dfine/weights``."""
    return Path(os.environ.get("DFINE_HOME") or Path.home() / ".cache" / "dfine") / "weights"


def get_entry(name: str) -> WeightsEntry:
    if name not in WEIGHTS:
        from dfine.registry import did_you_mean

        raise WeightsError(f"`{name}` is neither a file nor a released model{did_you_mean(name, WEIGHTS)}; "
                           f"known: {', '.join(WEIGHTS)}")
    return WEIGHTS[name]


def resolve_weights(name_or_path: str | os.PathLike) -> Path:
    """A checkpoint path: the file itself when it exists, else the released model of that name (fetched)."""
    if os.path.isfile(name_or_path):
        return Path(name_or_path)
    return fetch(get_entry(str(name_or_path)))


def expected_shapes(entry: WeightsEntry) -> dict[str, tuple] | None:
    """Shapes of the named model's state dict (built on the meta device: no memory, no weights), or None when
    the config is not available (an installed package without configs/)."""
    import dfine

    with torch.device("meta"):
        if entry.kind == "backbone":
            family, arch = entry.config.split(":")
            if family == "hgnetv2":
                from dfine.models.backbones.hgnetv2 import HGNetV2

                model: nn.Module = HGNetV2(arch, pretrained=False, freeze_norm=False)
            else:
                from dfine.models.backbones.presnet import PResNet

                model = PResNet(depth=int(arch), pretrained=False, freeze_norm=False)
        else:
            path = entry.config_path()
            if path is None:
                return None
            model = dfine.build_model(dfine.load_config(path), load_pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def verify_shapes(entry: WeightsEntry, path: Path) -> None:
    """Refuse a file whose tensors do not fit the model ``entry`` names (WeightsError names the tensor)."""
    expected = expected_shapes(entry)
    if expected is None:
        logger.warning("%s: configs/%s not found; the file's shapes are not checked", entry.name, entry.config)
        return
    try:
        state, _ = extract_state_dict(read_checkpoint(path), str(path))
    except CheckpointError as err:
        raise WeightsError(f"{entry.name}: {err}") from None
    mismatched = [(k, tuple(v.shape), expected[k]) for k, v in state.items()
                  if k in expected and tuple(v.shape) != expected[k] and not k.endswith(RECOMPUTED_BUFFERS)]
    shared = sum(k in expected for k in state)
    if mismatched or shared < len(expected) // 2:
        detail = (", ".join(f"{k}: file {list(a)} vs {entry.name} {list(b)}" for k, a, b in mismatched[:3])
                  if mismatched else f"only {shared} of the {len(expected)} tensors of {entry.name} are in it")
        raise WeightsError(f"{path} is not a {entry.name} checkpoint: {detail}")


def fetch(entry: WeightsEntry | str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The local file of ``entry``, downloaded into ``cache_dir`` (default ``weights_dir()``) on first use.
    Under torch.distributed rank 0 downloads while the others wait."""
    entry = get_entry(entry) if isinstance(entry, str) else entry
    folder = Path(cache_dir) if cache_dir else weights_dir()
    path = folder / entry.file_name
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_rank() != 0:
        dist.barrier()  # rank 0 downloads and checks first
        if not path.is_file():
            raise WeightsError(f"{entry.name}: rank 0 could not fetch {entry.url} (see its log); "
                               f"download it by hand and put it at {path}")
        return path
    try:
        if path.is_file():
            logger.info("%s: using cached %s", entry.name, path)
            try:
                verify_shapes(entry, path)
            except WeightsError as err:  # perhaps put there by hand: left in place, the user decides
                raise WeightsError(f"{err}; delete or replace {path} (source: {entry.url})") from None
        else:
            _download(entry, path, progress)
    finally:
        if distributed:
            dist.barrier()
    return path


def _download(entry: WeightsEntry, path: Path, progress: bool) -> None:
    from tqdm import tqdm

    by_hand = f"download it by hand and put it at {path}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WeightsError(f"{entry.name}: cannot create {path.parent} ({err}); set DFINE_HOME to a writable folder")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.file_name}.", suffix=".part", dir=path.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    logger.info("%s: downloading %s to %s", entry.name, entry.url, path)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(entry.url, timeout=60)  # noqa: S310 - URLs from the table
            except (urllib.error.URLError, OSError, ValueError) as err:
                raise WeightsError(f"{entry.name}: cannot download {entry.url} ({_reason(err)}); {by_hand}") from None
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                received = 0
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.name,
                          disable=not progress) as bar:
                    while True:
                        try:
                            chunk = response.read(CHUNK)
                        except (OSError, urllib.error.URLError, ValueError) as err:  # incl. http.client.IncompleteRead
                            raise WeightsError(f"{entry.name}: download of {entry.url} interrupted ({_reason(err)}); "
                                               f"retry, or {by_hand}") from None
                        if not chunk:
                            break
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                if total is not None and received != total:
                    raise WeightsError(f"{entry.name}: download of {entry.url} interrupted after {received} of {total} "
                                       f"bytes; retry, or {by_hand}")
            out.flush()
            os.fsync(out.fileno())
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            raise WeightsError(f"{entry.name}: checksum mismatch for {entry.url}: sha256 {digest.hexdigest()}, expected "
                               f"{entry.sha256}; the file was not kept (a corrupted or changed download)")
        verify_shapes(entry, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _reason(err: Exception) -> str:
    reason = getattr(err, "reason", None) or err
    return f"{type(err).__name__}: {reason}"


def load_pretrained(model: nn.Module, name: str, strict: bool = True):
    """Load the released weights ``name`` (or a checkpoint file) into ``model``; returns the LoadReport.
    ``strict=False`` skips what does not fit (other num_classes ...) and lists it."""
    return load_checkpoint(model, resolve_weights(name), strict=strict, source=name)
