"""Train the classifier head on the frozen VGG-Face base.

Writes work_dir/model/classifier.keras and training reports under work_dir/reports/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package beside this script (notebooks, %run)

from vggface_gender import cli  # noqa: E402


def main(argv=None) -> int:
    parser = cli.make_parser("train.py", __doc__)

    def body(args):
        cfg = cli.config_from_args(args)  # validate before the (slow) heavy imports
        from vggface_gender import training
        training.run_stage(cfg, args)

    return cli.run(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
