"""Evaluate a checkpoint on its validation set: the 12 COCO numbers, a per-class AP table and a metrics JSON.

    python tools/eval.py -r output/dfine_n_demo/best.pth                 # config read from the checkpoint
    python tools/eval.py -r dfine_n_coco.pth -c configs/dfine_n_coco.yml  # reference releases carry no config
    python tools/eval.py -r dfine_n_coco -c configs/dfine_n_coco.yml      # a released model by name (downloaded)
    torchrun --nproc_per_node=4 tools/eval.py -r best.pth -u val_dataloader.total_batch_size=64
    python tools/eval.py -r best.pth --deploy --compile                  # the inference form, torch.compile

EMA weights are evaluated when the checkpoint has them. Results go to the log and to
``<output_dir>/eval_metrics.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfine.checkpoint import CheckpointError, read_checkpoint
from dfine.cli import common
from dfine.config import ConfigError, config_from_checkpoint, load_config
from dfine.utils.allocator import retain_freed_memory


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--resume", required=True, help="checkpoint to evaluate, or a released model's name")
    parser.add_argument("-c", "--config", help="YAML config (default: the config stored in the checkpoint)")
    parser.add_argument("-d", "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--output-dir", help="where eval.log and eval_metrics.json go (default: the checkpoint's folder)")
    parser.add_argument("-u", "--update", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--deploy", action="store_true",
                        help="evaluate the inference form (model.deploy(): the encoder's conv + BN folded, RepVGG "
                        "branches merged), as infer.py and the ONNX export run it")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the evaluated model (config key `compile`)")
    return parser.parse_args(argv)


def config_for(args: argparse.Namespace) -> dict:
    overrides = list(args.update)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.compile:
        overrides.append("compile=true")
    overrides.append(f"output_dir={args.output_dir or Path(args.resume).resolve().parent}")
    if args.config:
        return load_config(args.config, overrides)
    return config_from_checkpoint(read_checkpoint(args.resume), overrides, source=args.resume)


def fetch_named(args: argparse.Namespace) -> None:
    """``-r NAME`` of a released model (dfine/weights.py): the downloaded file, its config when -c is not
    given, and output/eval_NAME rather than the download cache for the results."""
    import os

    from dfine.weights import fetch, get_entry

    if os.path.exists(args.resume):
        return
    if args.resume.endswith((".pth", ".pt")) or os.sep in args.resume:
        raise CheckpointError(f"checkpoint not found: {args.resume}")
    entry = get_entry(args.resume)  # an unknown name lists the known ones
    if entry.kind != "detector":
        raise ConfigError(f"{args.resume} is a backbone's weights, not a detector to evaluate")
    if not args.config and entry.config_path() is None:
        raise ConfigError(f"{args.resume} carries no config; pass configs/{entry.config} with -c")
    args.config = args.config or str(entry.config_path())
    args.output_dir = args.output_dir or str(Path("output") / f"eval_{entry.name}")
    args.resume = str(fetch(entry))


@common.run_tool
def main(argv=None) -> int:
    args = parse_args(argv)
    # before the checkpoint is read or anything is written; a released model's name is fetched first
    common.input_file(args.config, "-c")
    fetch_named(args)
    common.checkpoint_file(args.resume, "-r")
    common.output_dir(args.output_dir, "--output-dir")
    common.device(args.device, "-d")
    cfg = config_for(args)
    common.output_dir(cfg.get("output_dir"), "output_dir")
    if not args.device:  # e.g. `cuda` stored by a GPU run, evaluated on a laptop
        common.device(cfg.get("device"), "no -d given; the config's device")
    from dfine.engine.trainer import run

    retain_freed_memory()  # far fewer page faults per forward pass on CPU (figures: README, dfine/utils/allocator.py)
    return run(cfg, resume=args.resume, test_only=True, deploy=args.deploy)


if __name__ == "__main__":
    sys.exit(main())
