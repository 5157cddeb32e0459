"""Exceptions that the CLI maps to exit codes (design.md: 1 error, 3 mismatch)."""


class WeightopsError(Exception):
    """A user-facing failure: the message names the file and tensor; exit code 1."""

    exit_code = 1


class MismatchError(WeightopsError):
    """Verification or manifest mismatch: the data is wrong, not the invocation; exit 3."""

    exit_code = 3
