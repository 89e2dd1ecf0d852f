"""The ``ndif`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="ndif: interpretability on production inference.", no_args_is_help=True)
models = typer.Typer(help="Models: build tiny ones for tests and demos.", no_args_is_help=True)
app.add_typer(models, name="models")


@models.command("make-tiny")
def make_tiny(
    directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint and tokenizer.")],
    arch: Annotated[str, typer.Option(help="Architecture: llama or gpt2.")] = "llama",
    layers: Annotated[int, typer.Option(help="Number of transformer layers.")] = 4,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 64,
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a deterministic random-weight causal LM and a locally trained tokenizer."""
    from ndif.models.tiny import ARCHITECTURES
    from ndif.models.tiny import make_tiny as build

    if arch not in ARCHITECTURES:
        raise typer.BadParameter(f"choose one of {', '.join(ARCHITECTURES)}", param_hint="--arch")
    path = build(directory, arch=arch, layers=layers, hidden=hidden, vocab_size=vocab_size, seed=seed)  # type: ignore[arg-type]
    typer.echo(f"wrote a tiny {arch} model to {path}")


@app.command()
def demo(
    directory: Annotated[
        Path | None, typer.Option(help="Where to build the tiny model (default: a temporary folder).")
    ] = None,
) -> None:
    """Run the tracing demo on a tiny local model."""
    from .demo import run_demo

    run_demo(directory)


@app.command()
def version() -> None:
    """Print the installed versions."""
    import ndif

    from . import __version__

    typer.echo(f"ndif {ndif.__version__}, ndif-sdk {__version__}")


def main() -> None:
    app()
