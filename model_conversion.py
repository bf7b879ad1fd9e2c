"""Convert the MatConvNet VGG-Face .mat file into a Keras model.

Reads model.mat_path (MAT v5 or v7.3, either published layout) and writes
work_dir/model/base.keras and base.json. Use --verify IMAGE... to print the top-5 classes of
the converted network for some photos (for the real VGG-Face, a photo of A.J. Buckley should
come out first).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package beside this script (notebooks, %run)

from vggface_gender import cli  # noqa: E402


def main(argv=None) -> int:
    parser = cli.make_parser("model_conversion.py", __doc__)
    parser.add_argument("--verify", metavar="IMAGE", nargs="+", default=[],
                        help="after converting, print the top-5 classes of each image")

    def body(args):
        cfg = cli.config_from_args(args)  # validate before the (slow) heavy imports
        cli.import_tensorflow_quietly()
        from vggface_gender import conversion
        return conversion.run_stage(cfg, verify_images=args.verify or ())

    return cli.run(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
