"""Export a trained detector (model + postprocessor, deploy form) to ONNX, then prove the file reproduces PyTorch.

    python tools/export_onnx.py -r output/dfine_n_demo/best.pth -o dfine_n_demo.onnx        # config from the checkpoint
    python tools/export_onnx.py -c configs/dfine_n_coco.yml -r dfine_n_coco.pth --dynamic-batch --check-ap
    python tools/export_onnx.py -r best.pth --sampling discrete     # no grid_sample (safer for TensorRT FP16)

Inputs: ``images`` float32 [B, 3, H, W] in [0, 1] (H, W = eval_spatial_size), ``orig_target_sizes`` int64 [B, 2]
as (width, height). Outputs: ``labels`` [B, 300] (0..C-1), ``boxes`` [B, 300, 4] xyxy pixels, ``scores`` [B, 300].

After export, onnxruntime and PyTorch always run on the same images (``--images`` files, else seeded ones) and the
largest differences are printed; ``--check-ap`` also evaluates both on the validation set. The tool exits with
status 1, and does not call the export good, when they disagree beyond the tolerances.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from dfine.cli import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--resume", help="checkpoint to export (ours or a reference release)")
    parser.add_argument("-c", "--config", help="YAML config (default: the one stored in the checkpoint)")
    parser.add_argument("-o", "--output", help="ONNX file (default: the checkpoint's name with .onnx)")
    parser.add_argument("-u", "--update", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension")
    parser.add_argument("--batch-size", type=int, default=1, help="the fixed batch without --dynamic-batch")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--simplify", action="store_true", help="run onnxsim on the exported graph")
    parser.add_argument("--sampling", choices=("default", "discrete"), default="default",
                        help="deformable-attention sampling in the decoder; discrete avoids grid_sample")
    parser.add_argument("--images", nargs="*", default=[], help="image files for the parity check")
    parser.add_argument("--check-ap", action="store_true", help="also compare COCO AP on the validation set")
    parser.add_argument("--max-images", type=int, help="validation images for --check-ap (default: all)")
    parser.add_argument("--score-tol", type=float, default=1e-3, help="allowed |score| difference")
    parser.add_argument("--box-tol", type=float, default=0.5, help="allowed box difference in pixels")
    parser.add_argument("--ap-tol", type=float, default=0.002, help="allowed AP difference for --check-ap")
    return parser.parse_args(argv)


# grid_sample (the decoder's deformable sampling) needs opset 16; the TorchScript exporter stops at 20.
MIN_OPSET, MAX_OPSET = 16, 20


def output_path(args: argparse.Namespace) -> Path:
    return Path(args.output or Path(args.resume or "model").with_suffix(".onnx").name)


def check_arguments(args: argparse.Namespace) -> None:
    """Every argument, before a model is loaded or a file is written."""
    from dfine.errors import UsageError

    if not args.resume and not args.config:
        raise UsageError("give a checkpoint (-r) and/or a config (-c)")
    common.checkpoint_file(args.resume, "-r")
    common.input_file(args.config, "-c")
    common.output_file(output_path(args), "-o")
    common.at_least(args.batch_size, "--batch-size", 1)
    common.in_range(args.opset, "--opset", MIN_OPSET, MAX_OPSET)
    for image in args.images:
        common.input_file(image, "--images")
    common.at_least(args.max_images, "--max-images", 1)
    # tolerances are not checked: one nothing can meet (e.g. negative) is a way to see the refusal (exit 1)


@common.run_tool
def main(argv=None) -> int:
    args = parse_args(argv)
    check_arguments(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dfine.deploy import DeployModel, ExportError, OnnxDetector, compare_detections, export_onnx, load_detector
    from dfine.deploy.export import parity_images

    try:
        model, post, cfg, classes = load_detector(args.resume, args.config, args.update, sampling=args.sampling, deploy=True)
    except ValueError as err:  # ConfigError and the loader's own argument errors
        return common.report(err)
    size = cfg.get("eval_spatial_size") or [640, 640]
    output = output_path(args)
    deploy_model = DeployModel(model, post).eval()
    try:
        export_onnx(deploy_model, output, (int(size[0]), int(size[1])), dynamic_batch=args.dynamic_batch,
                    batch_size=args.batch_size, opset=args.opset, simplify=args.simplify,
                    classes={"names": classes.names, "label_to_category": classes.category_ids})
        detector = OnnxDetector(output)
        # two images at least, so a batched run is compared too (a fixed-batch graph runs them chunk by chunk)
        images, sizes = parity_images((int(size[0]), int(size[1])), max(2, args.batch_size), args.images)
        with torch.no_grad():
            reference = deploy_model(images, sizes)
        parity = compare_detections(reference, detector(images, sizes), args.score_tol, args.box_tol)
    except (ExportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"parity on {images.shape[0]} images: {parity.describe()}")
    failed = not parity.ok(args.score_tol, args.box_tol)
    if args.check_ap:
        from dfine.deploy.ap_check import compare_ap

        comparison = compare_ap(cfg, deploy_model, detector, args.max_images)
        print(comparison.table())
        if abs(comparison.onnx_ap - comparison.pytorch_ap) > args.ap_tol:
            print(f"AP differs by more than {args.ap_tol}", file=sys.stderr)
            failed = True
    if failed:
        print(f"error: {output} does NOT reproduce the PyTorch model (tolerances: score {args.score_tol}, "
              f"box {args.box_tol} px); do not deploy it. Try another --opset or --sampling discrete.", file=sys.stderr)
        return 1
    print(f"ok: {output} reproduces the PyTorch model (max abs diff {parity.max_abs_diff:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
