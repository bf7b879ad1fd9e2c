"""Sample the class folders (male/, female/) into train, validation and held-out test manifests.

Hashes every image by content (identical files never reach two splits), draws the test set
first, then the training sample, decode-checking each drawn image and replacing broken ones.
With faces.detect: mtcnn, each drawn image must show a usable face: its crop is written to
work_dir/faces/ and its box to the manifest; an image without one is reported and replaced.
Writes work_dir/splits/{train,val,test}.csv and summary.json. Never modifies the images.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package beside this script (notebooks, %run)

from vggface_gender import cli  # noqa: E402


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def main(argv=None) -> int:
    parser = cli.make_parser("data_preprocess.py", __doc__)
    parser.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                        help="threads for hashing and decoding (default: from the CPU count)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or report table (errors and warnings still print)")

    def body(args):
        cfg = cli.config_from_args(args)  # validate before any work
        if cfg.faces.detect != "none":  # the detector needs TensorFlow; without it the stage stays light
            cli.import_tensorflow_quietly()
        from vggface_gender import dataset
        dataset.run_stage(cfg, workers=args.workers, quiet=args.quiet)

    return cli.run(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
