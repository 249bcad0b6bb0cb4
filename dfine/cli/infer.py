"""Detect objects in an image, a folder of images or a video, with a checkpoint or an exported ONNX file.

    python tools/infer.py -r output/dfine_n_demo/best.pth --input photo.jpg
    python tools/infer.py -r best.pth --input images/ --batch-size 8 --threshold 0.5 --output runs/infer
    python tools/infer.py -r dfine_n.onnx -c best.pth --input clip.mp4   # -c (checkpoint or YAML): class names
    python tools/infer.py -r best.pth --input photo.jpg --no-deploy      # the training form (no folding)

Writes annotated copies (``<name>_det.jpg``, or ``<name>_det.mp4`` for a video) and ``results.json``: COCO result
records (``image_id``, ``category_id``, ``bbox`` [x, y, w, h] pixels, ``score``) of the detections above the
threshold; image ids count the input files in sorted order, or the frames of a video from 0.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dfine.cli import common
from dfine.utils.allocator import retain_freed_memory


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--resume", required=True, help="checkpoint (.pth) or exported model (.onnx)")
    parser.add_argument("-c", "--config", help="YAML config (default: the one stored in the checkpoint); with an "
                        ".onnx file, the checkpoint or config that names its classes")
    parser.add_argument("-u", "--update", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("-i", "--input", required=True, help="image file, folder of images, or video file")
    parser.add_argument("-o", "--output", default="output/infer", help="folder for annotated files and results.json")
    parser.add_argument("-t", "--threshold", type=float, default=0.4, help="lowest score drawn and written")
    parser.add_argument("-b", "--batch-size", type=int, default=1)
    parser.add_argument("-d", "--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: eval_spatial_size)")
    parser.add_argument("--deploy", action=argparse.BooleanOptionalAction, default=True,
                        help="a checkpoint runs in deploy form (model.deploy(): the encoder's conv + BN folded, RepVGG "
                        "branches merged; the same detections; default on). An .onnx file is always in deploy form")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="run the deploy form channels-last (NHWC): the same detections up to rounding, faster on "
                        "a CPU (README, Deployment); default: on for the CPU, off elsewhere (not measured on a GPU)")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    """Every argument, before a model is loaded or the output folder is made."""
    from dfine.deploy.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    common.checkpoint_file(args.resume, "-r")
    common.config_file(args.config, "-c")  # a YAML config, or a checkpoint that carries one
    common.input_file_or_dir(args.input, "-i", suffixes=sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
    common.output_dir(args.output, "-o")
    common.fraction(args.threshold, "--threshold")
    common.at_least(args.batch_size, "--batch-size", 1)
    common.image_size(args.size, "--size")
    common.device(args.device, "-d")
    if args.channels_last and not args.deploy:
        raise common.usage_error("--channels-last: it applies to the deploy form; drop --no-deploy or --channels-last")
    if args.channels_last and str(args.resume).endswith(".onnx"):
        raise common.usage_error(f"--channels-last: {args.resume} is an .onnx file, which onnxruntime runs in its "
                                 "own layout; the flag applies to checkpoints")


@common.run_tool
def main(argv=None) -> int:
    args = parse_args(argv)
    check_arguments(args)
    retain_freed_memory()  # far fewer page faults per forward pass on CPU (figures: README, dfine/utils/allocator.py)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dfine.deploy import Predictor
    from dfine.deploy.media import run_inference

    try:
        predictor = Predictor.from_file(args.resume, args.config, args.update, device=args.device, image_size=args.size,
                                        deploy=args.deploy, channels_last=args.channels_last)
        path = run_inference(predictor, args.input, args.output, args.threshold, args.batch_size)
    except ValueError as err:  # the deploy code's own argument errors (e.g. too few positions for num_queries)
        return common.report(err)
    print(f"results written to {path} ({predictor.kind}, input {predictor.image_size[1]}x{predictor.image_size[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
