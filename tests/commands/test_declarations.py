"""weightops.commands: the one declaration of each step command's parameters, which the CLI
is built from and job files are checked against."""

from __future__ import annotations

import inspect

import click

from weightops import commands
from weightops.cli import all_commands
from weightops.commands.gguf import export_arguments
from weightops.pipelines.gguf import export_gguf_matrix

NO_STEP = {"run", "demo", "inspect"}  # commands that make no sense as job steps


def _cli_command(op: str) -> click.Command:
    command = all_commands()[op]
    return command.commands["create"] if isinstance(command, click.Group) else command


def test_every_step_op_is_a_cli_command_built_from_its_declaration():
    assert set(all_commands()) - NO_STEP == set(commands.STEP_OPS)
    for op in commands.STEP_OPS:
        built, declared = _cli_command(op).params, commands.params(op)
        assert [id(p) for p in built] == [id(p) for p in declared], op


def test_gguf_values_map_onto_every_export_option(tiny_llama, tmp_path):
    """What the CLI and a fused unit pass to export_gguf_matrix: every keyword it takes but
    `warn` (the caller's own), and nothing it does not take."""
    argv = [str(tiny_llama), str(tmp_path / "out.gguf"), "--type", "q8_0", "--tp-lora-r", "4"]
    values = commands.parser("gguf").make_context("gguf", argv).params
    arguments = export_arguments(values)
    keywords = {
        name for name, p in inspect.signature(export_gguf_matrix).parameters.items() if p.kind is p.KEYWORD_ONLY
    }
    assert arguments.keys() == keywords - {"warn"}
    assert arguments["lora_options"] == {"rounding": "once", "tp_lora_r": 4, "tp_lora_alpha": None}
