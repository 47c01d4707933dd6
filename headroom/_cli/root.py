"""The root command's own options: `--version` and `--debug`."""

from pathlib import Path
from typing import Annotated

import typer

from .errors import DEBUG_KEY

__all__ = ["root", "version"]


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("headroom-memory")
    except metadata.PackageNotFoundError:  # a source checkout that was never installed
        import tomllib

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"headroom {version()}")
        raise typer.Exit()


def root(
    ctx: typer.Context,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", envvar="HEADROOM_DEBUG",
            help="Show the full traceback of an error instead of one line.",
        ),
    ] = False,
) -> None:
    """Headroom Memory: long-term memory for any OpenAI-compatible LLM app."""
    ctx.meta[DEBUG_KEY] = debug
