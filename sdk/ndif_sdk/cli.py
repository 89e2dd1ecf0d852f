"""The ``ndif`` command line.

    ndif up                                 # the service on this machine (a tiny model if no registry)
    ndif models                             # what the service serves
    ndif jobs list / status ID / result ID --out values.safetensors / cancel ID
    ndif batch list / status ID / results ID --out DIR / cancel ID
    ndif keys create NAME                   # with an admin key
    ndif chat MODEL "Hi" --steer joy=6 --probe mood   # a steered reply, streamed

The service's commands read ``NDIF_API_URL``/``NDIF_API_KEY`` (or the client config
file, ``NDIF_CLIENT_CONFIG``); ``--api-url``/``--api-key`` override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .commands import ApiKey, ApiUrl, AsJson, batch_app, jobs_app, keys_app, list_models

app = typer.Typer(help="ndif: interpretability on production inference.", no_args_is_help=True)
models = typer.Typer(help="Models: what the service serves, or build tiny ones for tests and demos.")
app.add_typer(models, name="models")
app.add_typer(jobs_app, name="jobs")
app.add_typer(batch_app, name="batch")
app.add_typer(keys_app, name="keys")


@models.callback(invoke_without_command=True)
def models_list(ctx: typer.Context, as_json: AsJson = False, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """The service's models (deployments): state, replicas ready, queued and running jobs.

    ``ndif models make-tiny DIR`` builds a tiny model locally instead.
    """
    if ctx.invoked_subcommand is None:
        list_models(api_url, api_key, as_json)


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
def up(
    registry: Annotated[
        Path | None,
        typer.Option(
            help="Model registry TOML (default: NDIF_REGISTRY, else a tiny Llama built in the state dir).",
            exists=True,
            dir_okay=False,
            metavar="FILE",
        ),
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="The API's port.")] = 8289,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the service keeps its files (default: NDIF_STATE_DIR or ~/.local/state/ndif).",
            file_okay=False,
            metavar="DIR",
        ),
    ] = None,
) -> None:
    """Run the service on this machine (API, dispatchers, model workers) until Ctrl-C."""
    from .launcher import up as run

    raise typer.Exit(run(registry, port, state_dir))


@app.command("chat")
def chat_command(
    model: Annotated[str, typer.Argument(help="The deployment to talk to.")],
    message: Annotated[str, typer.Argument(help="What to say.")],
    steer: Annotated[
        list[str] | None, typer.Option("--steer", "-s", help="A steering vector: NAME or NAME=SCALE; repeatable.")
    ] = None,
    probe: Annotated[str | None, typer.Option(help="A probe to read per token (shades each token).")] = None,
    norm: Annotated[int | None, typer.Option(help="Or: a layer whose stream norm shades each token.")] = None,
    max_tokens: Annotated[int, typer.Option(help="The reply's length limit.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Chat once with a served model, steered, streaming the reply token by token.

    ndif chat tiny-llama "How was your day?" --steer joy=6 --probe mood
    """
    from .commands import chat

    chat(model, message, steer, probe, norm, max_tokens, temperature, as_json, api_url, api_key)


@app.command()
def demo(
    directory: Annotated[
        Path | None, typer.Option(help="Where to build the tiny model (default: a temporary folder).")
    ] = None,
    service: Annotated[bool, typer.Option(help="Also start the embedded service stack and run remote traces.")] = True,
    playground: Annotated[
        bool, typer.Option(help="At the end, open the steering playground in a browser and serve it until Ctrl-C.")
    ] = False,
) -> None:
    """Run the demo on a tiny model: local tracing, then the same through the embedded service."""
    from .demo import run_demo

    run_demo(directory, service=service, playground=playground)
    typer.secho("demo complete", fg="green")


@app.command()
def version() -> None:
    """Print the installed versions."""
    import ndif

    from . import __version__

    typer.echo(f"ndif {ndif.__version__}, ndif-sdk {__version__}")


def main() -> None:
    app()
