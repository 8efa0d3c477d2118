"""The one exception type of the input pipeline.

Every data failure (missing files, a corrupt download, a dataset that tensorflow-datasets has
not prepared, an unknown name) is raised as :class:`DatasetError` with a one-line message that
says what is wrong and how to fix it, so that a run fails at start-up with an actionable
message instead of a stack trace from deep inside gzip or TensorFlow.
"""


class DatasetError(RuntimeError):
    """A dataset could not be loaded; the message says what is wrong and how to fix it."""
