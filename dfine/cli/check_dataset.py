"""Check a COCO-format dataset before training: missing or corrupt images, bad boxes, category ids, num_classes.

    python tools/check_dataset.py --ann-file dataset/coco/annotations/instances_val2017.json \
        --img-folder dataset/coco/val2017 --num-classes 80 --remap-mscoco-category

Exit status 1 when a fatal problem is found (training would fail or learn garbage), 2 for an argument that cannot
work (a folder given as --ann-file, --num-classes 0), 0 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dfine.cli import common
from dfine.data.checks import check_dataset


@common.run_tool
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann-file", required=True, help="COCO instances json")
    parser.add_argument("--img-folder", required=True, help="folder the json's file_name entries are relative to")
    parser.add_argument("--num-classes", type=int, help="num_classes of the config you will train with")
    parser.add_argument("--remap-mscoco-category", action="store_true", help="COCO's 91 ids -> 80 labels")
    parser.add_argument("--category-mapping", default="auto", choices=("auto", "identity"),
                        help="how other category ids become labels (see dfine/data/coco.py)")
    parser.add_argument("--skip-images", action="store_true", help="check the json only, not the image files")
    args = parser.parse_args(argv)
    # a missing annotation file is reported as a fatal dataset problem (status 1); the wrong kind of path is a usage error
    if Path(args.ann_file).is_dir():
        common.input_file(args.ann_file, "--ann-file")
    if Path(args.img_folder).is_file():
        common.input_dir(args.img_folder, "--img-folder")
    common.at_least(args.num_classes, "--num-classes", 1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = check_dataset(args.ann_file, args.img_folder, args.num_classes, args.remap_mscoco_category,
                           args.category_mapping, check_images=not args.skip_images)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
