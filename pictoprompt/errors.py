"""Error types shared by every floor.

Each error carries a sentence a user can act on: what was wrong and what is accepted. The server turns any
`PictopromptError` into an `isError` tool result with that sentence; the CLI prints it and exits non-zero.
"""


class PictopromptError(Exception):
    """Base class: an error whose message tells the user what to do."""


class InvalidInputError(PictopromptError):
    """An argument, image or file the caller gave cannot be used."""


class NotFoundError(PictopromptError):
    """A named thing (asset, job, concept, profile) does not exist."""


class ModelNotFoundError(PictopromptError):
    """A profile names weights that are not on this machine."""


class BusyError(PictopromptError):
    """The job queue is full; the caller should try again later."""


class JobCancelledError(PictopromptError):
    """The work was cancelled between two steps."""
