"""One exception type for bad user input: the CLI prints it as a single line and exits non-zero."""


class VllmTrainError(Exception):
    """Bad input (a file, a record, a config value, a path). The message names what and where."""
