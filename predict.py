"""Evaluate the classifier on the held-out test set, or classify new images.

Writes work_dir/reports/metrics.json, predictions.csv and plots; --images PATH... classifies files.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package beside this script (notebooks, %run)

from vggface_gender import cli  # noqa: E402


def main(argv=None) -> int:
    parser = cli.make_parser("predict.py", __doc__)

    def body(args):
        cfg = cli.config_from_args(args)  # validate before the (slow) heavy imports
        from vggface_gender import evaluation
        evaluation.run_stage(cfg, args)

    return cli.run(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
