"""Train the classifier head on the frozen VGG-Face base.

Writes work_dir/model/classifier.keras (+ classifier.json) and work_dir/reports/history.csv,
training_curves.png and train_summary.json. The frozen base's features are cached in
work_dir/features/ and reused while the model, the manifests and the image policy are unchanged.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package beside this script (notebooks, %run)

from vggface_gender import cli  # noqa: E402


def main(argv=None) -> int:
    parser = cli.make_parser("train.py", __doc__)
    parser.add_argument("--no-early-stopping", action="store_true",
                        help="train exactly train.max_epochs epochs and keep the last weights")

    def body(args):
        cfg = cli.config_from_args(args)  # validate before the (slow) heavy imports
        cli.import_tensorflow_quietly()
        from vggface_gender import training
        training.run_stage(cfg, early_stopping=not args.no_early_stopping)

    return cli.run(parser, body, argv)


if __name__ == "__main__":
    code = main()
    if "IPython" in sys.modules:  # `%run train.py` in a notebook: never end the kernel
        sys.exit(code)
    # TensorFlow's interpreter teardown takes 1-2 s. Every output is written, fsynced and
    # renamed into place by now (or was never started), so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
