"""Train or evaluate a detector from a config.

    python tools/train.py -c configs/dfine_n_demo.yml
    torchrun --nproc_per_node=8 tools/train.py -c configs/dfine_x_coco.yml --use-amp
    torchrun --nproc_per_node=8 --max-restarts=3 tools/train.py -c configs/dfine_x_coco.yml -r auto

Exit codes: 0 done, 2 a user error (one line on stderr), 3 the dataset pre-flight check failed, 75 stopped by
SIGTERM/SIGUSR1 after saving last.pth (resume with -r auto).
    python tools/train.py -c configs/dfine_n_coco.yml --print-config -u epochs=3
"""

from __future__ import annotations

import argparse
import sys

from dfine.config import ConfigError, config_to_yaml, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="YAML config file")
    parser.add_argument("-r", "--resume", help="checkpoint to resume training from (everything is restored); "
                        "`auto`: output_dir/last.pth when it exists, else a fresh start (for restarts and requeues)")
    parser.add_argument("-t", "--tuning", help="weights to fine-tune from (mismatched shapes are skipped and listed)")
    parser.add_argument("-d", "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--use-amp", action="store_true", default=None, help="mixed precision training")
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
        ("output_dir", args.output_dir),
        ("summary_dir", args.summary_dir),
        ("tuning", args.tuning),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from dfine.engine.checkpointing import resolve_resume
    from dfine.engine.trainer import run
    from dfine.errors import USER_ERRORS

    try:
        resume = resolve_resume(args.resume, cfg.get("output_dir") or "output", cfg)
        return run(cfg, resume=resume, test_only=args.test_only)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
