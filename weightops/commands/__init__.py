"""The parameters of every command that can be a job step, declared once.

`cli/` builds its click commands from these declarations (adding each command's help text
and what it does with the values), and `jobs/` validates and parses job-file steps against
the same ones: a step's keys are the command line's options, with the same names, types,
choices and defaults, and the job runner never imports the CLI. A declaration is the tuple
of click parameters in command-line order (arguments, then options as --help lists them).

One module per command family, imported on first use: gguf's choices come from the
quantizer's tables, which `weightops manifest` should not pay for.
"""

from __future__ import annotations

import importlib

import click

Params = tuple[click.Parameter, ...]

# op (a job step's `op`, the command's name) -> the module and name of its declaration;
# `manifest` is `manifest create`
STEP_OPS = {
    "apply-delta": ("delta", "APPLY_DELTA"),
    "make-delta": ("delta", "MAKE_DELTA"),
    "merge-lora": ("merge_lora", "MERGE_LORA"),
    "expand-vocab": ("vocab", "EXPAND_VOCAB"),
    "gguf": ("gguf", "GGUF"),
    "imatrix": ("imatrix", "IMATRIX"),
    "bnb": ("bnb", "BNB"),
    "convert": ("convert", "CONVERT"),
    "verify": ("verify", "VERIFY"),
    "manifest": ("core", "MANIFEST_CREATE"),
}


def params(op: str) -> Params:
    """The declared parameters of `op` (one of STEP_OPS)."""
    module, name = STEP_OPS[op]
    declared: Params = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return declared


def parser(op: str) -> click.Command:
    """A click command with `op`'s parameters and no action: `parser(op).make_context(op, argv)`
    parses a step's command line as the CLI parses it (the same values and usage errors)."""
    return click.Command(op, params=list(params(op)))
