"""One exception type for every mistake a user can fix.

The CLI prints these as a single line (``error: ...``) and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class CamBackdoorError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""


class TrainingDiverged(CamBackdoorError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
