"""The one base class for errors a user can fix; the CLI prints them as one line."""


class CharRNNError(ValueError):
    """Bad input or state that the user can fix; ``str(e)`` says what and how."""
