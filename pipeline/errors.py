"""Errors the user can act on. The CLIs print them as one clear message, without a traceback."""


class UserInputError(ValueError):
    """Bad input (a config value, a file, a model name): the message names the problem and the fix."""


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the message says what to change."""


# The attribute of an interruption (Ctrl-C, SIGTERM) that says how to continue the killed run: pipeline.train prints it.
RESUME_HINT = "resume_hint"
