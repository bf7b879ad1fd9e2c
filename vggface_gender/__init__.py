"""Male/female face classification on top of VGG-Face (MatConvNet weights).

The Python API (the scripts call the same functions):

- ``Classifier.load(work_dir)``: the trained classifier; ``.classes``, ``.predict_proba(images)``
  (paths, PIL images, uint8 arrays), ``.predict``, ``.in_training``, ``.predict_faces(photos)``
  (per face: box, detector confidence, probabilities, label) with a classifier trained with
  face detection
- ``make_splits``, ``convert``, ``train``, ``evaluate``: the four stages, keyword arguments

The four top-level scripts (data_preprocess, model_conversion, train, predict) are thin
wrappers; the logic lives here, one module per concern:

- ``config``     the one config schema, defaults, validation, ``--set`` overrides
- ``classifier`` the trained classifier (base + head) as one object: the Python API
- ``stages``     the four stages as functions with keyword arguments
- ``cli``        shared argument parsing and one-line error reporting for the scripts
- ``errors``     the exception types that become one-line errors
- ``workdir``    where each stage writes, and atomic writes
- ``progress``   progress bars (tqdm) for terminals, log files and notebooks; Keras `verbose`
- ``images``     the one image loader (decode, orientation, colour, resize)
- ``dataset``    sampling and splitting the class folders
- ``matconvnet`` reading MatConvNet SimpleNN ``.mat`` files (v5 and v7.3)
- ``layers``     the few Keras layer classes with no built-in equivalent
- ``keras_model`` building the Keras network from a parsed MatConvNet net
- ``conversion`` the conversion stage (``--verify`` too)
- ``features``   the cached frozen-base features
- ``training``   the classifier head and its training
- ``tf_images``  ``tf.data`` pipelines over the image loader
- ``metrics``    evaluation metrics (scikit-learn)
- ``evaluation`` the predict stage: test-set report and ``--images`` classification
- ``reports``    plots and console tables
- ``synthetic``  generated MatConvNet files and images (tests, demo, benchmarks)
- ``demo``       the demo: all four stages on generated inputs

Importing this package is cheap: TensorFlow is only imported by the modules that need it.
A saved model that uses one of the package's registered layers (padded pooling, LRN: not
VGG-Face) needs ``import vggface_gender.layers`` before ``keras.saving.load_model``.
"""

__version__ = "0.2.0"

from .classifier import Classifier, FacePrediction  # noqa: E402  (imports no TensorFlow until a model is loaded)
from .stages import convert, evaluate, make_splits, train  # noqa: E402

__all__ = ["Classifier", "FacePrediction", "make_splits", "convert", "train", "evaluate"]
