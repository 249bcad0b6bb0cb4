"""Check a dataset before training: missing or corrupt images, bad boxes, category ids, num_classes.

    python tools/check_dataset.py --data /data/mine          # COCO, Roboflow COCO or YOLO layout, every split
    python tools/check_dataset.py --data /data/mine/data.yaml --num-classes 3
    python tools/check_dataset.py --ann-file dataset/coco/annotations/instances_val2017.json \
        --img-folder dataset/coco/val2017 --num-classes 80 --remap-mscoco-category

YOLO label faults are reported as file:line with the fix.

Exit status 1 when a fatal problem is found (training would fail or learn garbage), 2 for an argument that cannot
work (a folder given as --ann-file, --num-classes 0, a --data folder in no known layout), 0 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dfine.cli import common
from dfine.data.checks import check_data, check_dataset


@common.run_tool
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="dataset folder or YOLO data.yaml (layout detected; all splits checked)")
    parser.add_argument("--ann-file", help="COCO instances json")
    parser.add_argument("--img-folder", help="folder the json's file_name entries are relative to")
    parser.add_argument("--num-classes", type=int, help="num_classes of the config you will train with")
    parser.add_argument("--remap-mscoco-category", action="store_true", help="COCO's 91 ids -> 80 labels")
    parser.add_argument("--category-mapping", default="auto", choices=("auto", "identity"),
                        help="how other category ids become labels (see dfine/data/coco.py)")
    parser.add_argument("--skip-images", action="store_true", help="check the json only, not the image files")
    args = parser.parse_args(argv)
    if bool(args.data) == bool(args.ann_file or args.img_folder) or bool(args.ann_file) != bool(args.img_folder):
        raise common.usage_error("give either --data PATH, or both --ann-file and --img-folder")
    # a missing annotation file is reported as a fatal dataset problem (status 1); the wrong kind of path is a usage error
    if args.ann_file and Path(args.ann_file).is_dir():
        common.input_file(args.ann_file, "--ann-file")
    if args.img_folder and Path(args.img_folder).is_file():
        common.input_dir(args.img_folder, "--img-folder")
    common.at_least(args.num_classes, "--num-classes", 1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.data:
        common.input_file_or_dir(args.data, "--data")
        reports = check_data(args.data, args.num_classes, check_images=not args.skip_images)  # DatasetError: exit 2
    else:
        reports = [check_dataset(args.ann_file, args.img_folder, args.num_classes, args.remap_mscoco_category,
                                 args.category_mapping, check_images=not args.skip_images)]
    for report in reports:
        for line in report.lines():
            print(line)
    return 0 if all(report.ok for report in reports) else 1

if __name__ == "__main__":
    sys.exit(main())
