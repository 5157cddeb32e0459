"""`python -m weightops` = the `weightops` command (the job runner starts steps this way)."""

from .cli import run

run()
