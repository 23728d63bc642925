"""The one exception type for bad input the user can fix."""


class UserError(ValueError):
    """Bad input (config, dataset, checkpoint, weights): the CLI prints the message as one line, no traceback."""
