"""The one base class for errors a user can fix; the CLI prints them as one line."""


class CharRNNError(ValueError):
    """Bad input or state that the user can fix; ``str(e)`` says what and how.

    ``exit_code`` is the status the CLI exits with.
    """

    exit_code = 2
