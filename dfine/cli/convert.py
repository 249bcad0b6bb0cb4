"""Convert between our checkpoints and Hugging Face transformers model folders (D-FINE and RT-DETRv2).

    python tools/convert.py --to-hf -c configs/dfine_n_coco.yml -r dfine_n_coco.pth -o hf/dfine-n   # reference release
    python tools/convert.py --to-hf -r output/dfine_n_custom/best.pth -o hf/my-model               # config from checkpoint
    python tools/convert.py --from-hf path/to/dfine-nano-coco -o dfine_n_from_hf.pth                # then tools/eval.py -r

--from-hf reads a local folder (download it first, e.g. `huggingface-cli download ustc-community/dfine-nano-coco
--local-dir dfine-nano-coco`). Its training settings come from -c, by default the matching size's COCO config.
Conversion moves weights only: fine-tune here, since transformers' D-FINE loss differs from the reference's
(see dfine/interop/hf.py). Needs `pip install -e .[hf]`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dfine.checkpoint import extract_state_dict, read_checkpoint
from dfine.cli import common
from dfine.config import ConfigError, config_from_checkpoint, load_config

ROOT = Path(__file__).resolve().parents[2]
logger = logging.getLogger("convert")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to-hf", action="store_true", help="our checkpoint (-r) -> transformers folder (-o)")
    direction.add_argument("--from-hf", metavar="HF_DIR", help="transformers folder -> our checkpoint (-o)")
    parser.add_argument("-c", "--config", help="YAML config (--to-hf: the model's; --from-hf: training settings)")
    parser.add_argument("-r", "--resume", help="--to-hf: checkpoint to convert (EMA weights preferred)")
    parser.add_argument("-o", "--output", required=True, help="output folder (--to-hf) or .pth file (--from-hf)")
    parser.add_argument("--no-verify", action="store_true", help="--to-hf: skip loading the result back with transformers")
    return parser.parse_args(argv)


def to_hf(args: argparse.Namespace) -> None:
    from dfine.interop.hf import convert_to_hf

    if not args.resume:
        raise ConfigError("--to-hf needs the checkpoint to convert (-r)")
    checkpoint = read_checkpoint(args.resume)
    state, where = extract_state_dict(checkpoint, args.resume)
    cfg = load_config(args.config) if args.config else config_from_checkpoint(checkpoint, source=args.resume)
    out = convert_to_hf(cfg, state, args.output, classes=checkpoint.get("classes"), verify=not args.no_verify)
    logger.info("converted %s [%s] -> %s", args.resume, where, out)


def from_hf(args: argparse.Namespace) -> None:
    from dfine.engine.checkpointing import atomic_save
    from dfine.interop.hf import convert_from_hf

    checkpoint = convert_from_hf(args.from_hf, base_config=args.config, configs_dir=ROOT / "configs")
    atomic_save(checkpoint, args.output)
    logger.info("converted %s -> %s (evaluate with: python tools/eval.py -r %s)", args.from_hf, args.output, args.output)


def check_arguments(args: argparse.Namespace) -> None:
    """Every argument, before a checkpoint is read or anything is written."""
    common.input_dir(args.from_hf, "--from-hf")
    common.checkpoint_file(args.resume, "-r")
    common.input_file(args.config, "-c")
    if args.to_hf:
        common.output_dir(args.output, "-o")
    else:
        common.output_file(args.output, "-o")


@common.run_tool
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    check_arguments(args)
    from dfine.interop.hf import ConversionError

    try:
        to_hf(args) if args.to_hf else from_hf(args)
    except ImportError as err:
        return common.report(f"{err}; install the Hugging Face extra: pip install -e .[hf]")
    except ConversionError as err:
        return common.report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
