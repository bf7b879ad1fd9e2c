"""Convert the MatConvNet VGG-Face .mat file into a Keras model.

Writes work_dir/model/base.keras and base.json. Use --verify IMAGE... to print the top-5
classes of the converted network for some photos.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package beside this script (notebooks, %run)

from vggface_gender import cli  # noqa: E402


def main(argv=None) -> int:
    parser = cli.make_parser("model_conversion.py", __doc__)

    def body(args):
        cfg = cli.config_from_args(args)  # validate before the (slow) heavy imports
        from vggface_gender import conversion
        conversion.run_stage(cfg, args)

    return cli.run(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
