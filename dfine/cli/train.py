"""Train or evaluate a detector from a config.

    python tools/train.py -c configs/dfine_n_demo.yml
    torchrun --nproc_per_node=8 tools/train.py -c configs/dfine_x_coco.yml --use-amp
    torchrun --nproc_per_node=8 --max-restarts=3 tools/train.py -c configs/dfine_x_coco.yml -r auto
    python tools/train.py -c configs/dfine_n_coco.yml --print-config -u epochs=3
    python tools/train.py -c configs/dfine_s_coco.yml --compile          # torch.compile (first steps compile)
    dfine train -c configs/dfine_n_demo.yml -r auto      # resume output_dir/last.pth when there is one

Exit codes: 0 done, 2 a user error (one line on stderr), 3 the dataset pre-flight check failed, 75 stopped by
SIGTERM/SIGUSR1 after saving last.pth (resume with -r auto).
"""

from __future__ import annotations

import argparse
import sys

from dfine.cli import common
from dfine.config import config_to_yaml, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="YAML config file")
    parser.add_argument("-r", "--resume", help="checkpoint to resume training from (everything is restored); "
                        "`auto`: output_dir/last.pth when it exists, else a fresh start (for restarts and requeues)")
    parser.add_argument("-t", "--tuning", help="weights to fine-tune from (mismatched shapes are skipped and listed)")
    parser.add_argument("-d", "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--use-amp", action="store_true", default=None, help="mixed precision training")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the training forward and the evaluated model (config key `compile`)")
    parser.add_argument("--output-dir", help="where checkpoints and logs go")
    parser.add_argument("--summary-dir", help="TensorBoard folder")
    parser.add_argument("--test-only", action="store_true", help="evaluate only")
    parser.add_argument("-u", "--update", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> dict:
    """The resolved config: the file, then -u overrides, then the command-line flags that mirror config keys."""
    overrides = list(args.update)
    for key, value in (
        ("device", args.device),
        ("seed", args.seed),
        ("use_amp", args.use_amp),
        ("compile", args.compile),
        ("output_dir", args.output_dir),
        ("summary_dir", args.summary_dir),
        ("tuning", args.tuning),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides)


def check_arguments(args: argparse.Namespace, cfg: dict) -> None:
    """Inputs exist, outputs can be written, the device exists: before any data or model is touched."""
    if args.resume != "auto":  # auto: output_dir/last.pth when there is one (checked by resolve_resume)
        common.checkpoint_file(args.resume, "-r")
    common.weights_file(cfg.get("tuning"), "-t" if args.tuning else "tuning")
    common.output_dir(cfg.get("output_dir"), "--output-dir" if args.output_dir else "output_dir")
    common.output_dir(cfg.get("summary_dir"), "--summary-dir" if args.summary_dir else "summary_dir")
    device = common.device(cfg.get("device"), "-d" if args.device else "device")
    from dfine.devices import amp_note

    note = device is not None and amp_note(device, bool(cfg.get("use_amp")), cfg.get("amp_dtype"))
    if note:
        print(f"warning: {note}", file=sys.stderr)


@common.run_tool
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    check_arguments(args, cfg)
    from dfine.engine.checkpointing import resolve_resume
    from dfine.engine.trainer import run

    resume = resolve_resume(args.resume, cfg.get("output_dir") or "output", cfg)
    return run(cfg, resume=resume, test_only=args.test_only)


if __name__ == "__main__":
    sys.exit(main())
