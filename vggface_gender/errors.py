"""Exceptions that the scripts turn into a one-line message and a non-zero exit."""


class PipelineError(Exception):
    """An error caused by the user's input (a file, a folder, a config value).

    The message must be one line that names the file (or key) and what is wrong;
    ``cli.run`` prints it as ``error: <message>`` without a traceback.
    """


class ConfigError(PipelineError):
    """A config file or ``--set`` override is invalid."""


class MissingInputError(PipelineError):
    """A stage's input is missing: the message names the stage to run first."""


class ImageError(PipelineError):
    """An image file cannot be read or decoded."""


class ModelFileError(PipelineError):
    """A MatConvNet ``.mat`` file cannot be read or converted."""


class DataError(PipelineError):
    """The image folders cannot give the requested splits (missing, empty, too few images),
    or a split manifest is malformed."""
