"""The trainer's own error, importable without torch (``cli.common`` catches it for every command)."""


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a resume that does not match)."""
