"""User-facing errors: one clear message naming the file, key or value and the fix."""


class UserError(Exception):
    """A mistake in the user's input (config, path, data) that we explain instead of a traceback.

    The entry points (`train.py`, `sample.py`, `python -m ldm...`) catch it and print only the message.
    """


class TrainingDiverged(UserError, FloatingPointError):
    """The training loss became NaN/inf: a setting (learning rate, data) to change, not a bug to trace.

    Also a `FloatingPointError`, so code that caught the old exception type still does.
    """
