"""The command-line application every command module registers on: the typer app, its consoles, the
entry point that turns every user error into one line, and options shared by several commands."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from ablate import AblateError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Robustness studies of safety training: refusal-direction ablation, LoRA attacks, evaluation, reports.",
)
console = Console(stderr=True)
# A file or a pipe gets 200 columns, not rich's default 80 (which cut figures short).
stdout = Console() if sys.stdout.isatty() else Console(width=200)


# What Ctrl-C keeps and how to go on, set by the command that is running (one line on stderr).
on_interrupt = {"note": "interrupted: every file already written is complete (writes are atomic); "
                         "rerun the command to continue"}


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every user error becomes one line on stderr and exit status 2.

    `--debug` (anywhere on the command line) or ABLATE_DEBUG=1 shows the traceback instead.
    """
    import os

    from rich.markup import escape

    try:  # typer >= 0.20 carries its own copy of click, whose exceptions are these
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as click_errors

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ABLATE_DEBUG", "") not in ("", "0")
    args = [arg for arg in args if arg != "--debug"]

    def fail(message: str, code: int = 2) -> None:
        console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
        sys.exit(code)

    try:
        code = app(args=args, prog_name="ablate", standalone_mode=False)
    except AblateError as error:
        if debug:
            raise
        fail(str(error))
    except click_errors.NoArgsIsHelpError as error:
        error.show()
        sys.exit(2)
    except click_errors.UsageError as error:
        where = f"{error.ctx.command_path}: " if error.ctx is not None else ""
        fail(f"{where}{error.format_message()} (see --help)")
    except click_errors.ClickException as error:
        fail(error.format_message())
    except (KeyboardInterrupt, typer.Abort):  # typer's own Abort: its click copy has none
        code = 130
    except OSError as error:  # a path the user named: unreadable, read-only, full disk, a folder for a file
        if debug:
            raise
        where = f"{error.filename}: " if error.filename else ""
        fail(f"{where}{error.strerror or error} (rerun with --debug for the traceback)")
    except Exception as error:  # a bug, not a bad input: still one line, the traceback behind --debug
        if debug:
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        fail(f"internal error {type(error).__name__}: {first[:300]} (rerun with --debug for the traceback, "
             "and please report it)", code=1)
    if code == 130:  # typer turns Ctrl-C into exit status 130 without a word
        console.print(on_interrupt["note"], highlight=False, soft_wrap=True, markup=False)
    sys.exit(code or 0)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error instead of one line "
                                                      "(also ABLATE_DEBUG=1; accepted anywhere on the line)."),
) -> None:
    """Robustness studies of safety training: refusal-direction ablation, LoRA attacks, evaluation, reports."""


def overwrite_option(what: str):
    return typer.Option(False, "--overwrite", help=f"Write into {what} even if it holds files ablate did not write "
                                                   "(they are kept; same-named files are replaced).")


def model_config_from_options(spec: str, device: str, quantization: str, device_map: str | None):
    """A ModelConfig from command-line options; a bad value is one line naming the option."""
    from ablate.config import ModelConfig, validate_config

    return validate_config({"spec": spec, "device": device, "quantization": quantization, "device_map": device_map},
                           ModelConfig, "command line")
