"""Evaluate the classifier on the held-out test set, or classify new images.

Without --images: predicts work_dir/splits/test.csv and writes work_dir/reports/metrics.json,
predictions.csv, roc_curve.png, confusion_matrix.png and errors.png (and groups.png when
evaluate.groups is set), and prints the report.

With --images PATH...: classifies image files and folders (recursively) into a CSV
(path, predicted, prob_<class>..., error) on stdout or --out FILE; a file that cannot be read
gets a row with its error and the others go on. A classifier trained with face detection
gives one row per face (face index, box, detector confidence), a "no face found" row for a
photo without one, and with --annotate DIR annotated copies of the photos.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package beside this script (notebooks, %run)

from vggface_gender import cli  # noqa: E402


def main(argv=None) -> int:
    parser = cli.make_parser("predict.py", __doc__)
    parser.add_argument("--images", nargs="+", metavar="PATH", default=None,
                        help="classify these image files and folders (recursively) instead of evaluating")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="with --images: write the CSV here instead of to stdout")
    parser.add_argument("--annotate", metavar="DIR", default=None,
                        help="with --images and a classifier trained with face detection: write copies "
                             "of the photos with each face's box and label drawn into DIR")

    def body(args):
        cfg = cli.config_from_args(args)  # validate before the (slow) heavy imports
        cli.import_tensorflow_quietly()
        from vggface_gender import evaluation
        return evaluation.run_stage(cfg, images=args.images, out=args.out, annotate=args.annotate)

    return cli.run(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
