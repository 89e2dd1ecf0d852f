"""The service's commands of ``ndif``: ``jobs``, ``batch``, ``models`` and ``keys``.

Each command talks to the service through `Client` (settings from ``NDIF_API_URL``,
``NDIF_API_KEY`` or the client config file; ``--api-url``/``--api-key`` override).
A refusal of the service, or a service that cannot be reached, is one red line on
stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ndif.wire import codec
from ndif.wire.schema import ErrorInfo, Result
from ndif.wire.values import WireError

from . import jobs as job_handles
from .client import FINAL, Client
from .config import config_path
from .errors import AuthenticationError, JobFailed, QuotaExceeded, ServiceError

STATUSES = ("RECEIVED", "QUEUED", "DISPATCHED", "RUNNING", "COMPLETED", "ERROR", "CANCELLED")
STATUS_STYLES = {
    "RECEIVED": "dim",
    "QUEUED": "dim",
    "DISPATCHED": "blue",
    "RUNNING": "cyan",
    "COMPLETED": "green",
    "ERROR": "red",
    "CANCELLED": "yellow",
}
MODEL_STATE_STYLES = {"ready": "green", "degraded": "yellow", "down": "red", "unknown": "dim"}
OUT_SUFFIXES = (".safetensors", ".pt", ".pth")

ApiUrl = Annotated[
    str | None,
    typer.Option("--api-url", help="The service's URL (default: NDIF_API_URL, else the client config).", metavar="URL"),
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", help="API key (default: NDIF_API_KEY, else the client config).", metavar="KEY"),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

jobs_app = typer.Typer(help="Jobs: list, follow, fetch results, cancel.", no_args_is_help=True)
batch_app = typer.Typer(help="Batch experiments: list, follow, fetch results, cancel.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (needs an admin key).", no_args_is_help=True)


# -- plumbing ---------------------------------------------------------------------------


def fail(message: str) -> NoReturn:
    """One red line on stderr, exit status 1."""
    typer.secho(f"error: {' '.join(message.split())}", fg="red", err=True)
    raise typer.Exit(1)


def _local_stack_config() -> Path | None:
    """The client config an embedded stack (``ndif up``) wrote on this machine, if any."""
    from .launcher import default_state_dir

    path = default_state_dir() / "client.toml"
    return path if path.exists() else None


def describe(error: ServiceError, client: Client) -> str:
    """A service error as one line, with a hint where one helps."""
    if error.status == 0:  # unreachable
        message = error.detail
        if urlsplit(client.api_url).hostname in ("127.0.0.1", "localhost", "::1"):
            message += " (start one on this machine with: ndif up)"
        return message
    message = f"{error.detail} (HTTP {error.status})"
    if isinstance(error, QuotaExceeded):
        message += f"; try again in {error.retry_after:g} s"
    if isinstance(error, AuthenticationError) and not client.api_key:
        local = _local_stack_config()
        if local is not None:
            message += f"; the local stack's key is in {local}: export NDIF_CLIENT_CONFIG={local}"
    return message


def _transport_error(error: httpx.TransportError, client: Client) -> str:
    try:
        where = str(error.request.url.copy_with(query=None))
    except RuntimeError:
        where = client.api_url
    return f"cannot reach {where} ({type(error).__name__}: {str(error) or 'no answer'}); is the service up?"


@contextmanager
def connect(api_url: str | None = None, api_key: str | None = None) -> Iterator[Client]:
    """A client for one command; service errors become `fail`."""
    try:
        shared = api_url is None and api_key is None
        client = job_handles.default_client() if shared else Client(api_url, api_key)
    except (OSError, tomllib.TOMLDecodeError) as error:
        fail(f"cannot read the client configuration {config_path()}: {error}")
    try:
        yield client
    except ServiceError as error:
        fail(describe(error, client))
    except httpx.TransportError as error:
        fail(_transport_error(error, client))
    except (JobFailed, WireError) as error:
        fail(str(error))
    finally:
        if not shared:
            client.close()


class Output:
    """Rich output on stdout: lines without trailing blanks, wide when not a terminal (pipes)."""

    def __init__(self) -> None:
        wide = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
        self.console = Console(width=200 if wide else None, highlight=False)

    def print(self, *renderables: Any) -> None:
        with self.console.capture() as captured:
            self.console.print(*renderables)
        typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def table(*columns: str) -> Table:
    grid = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        grid.add_column(column, no_wrap=column in ("ID", "JOB"))
    return grid


def styled(value: str, styles: dict[str, str]) -> Text:
    return Text(value, style=styles.get(value, ""))


def when(value: str | None) -> str:
    """An API timestamp in local time (naive ones are UTC)."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"  # pragma: no cover


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def counts_line(counts: dict[str, int]) -> Text:
    text = Text()
    for status in [*STATUSES, *sorted(set(counts) - set(STATUSES))]:
        if counts.get(status):
            if text:
                text.append("  ")
            text.append(f"{status} {counts[status]}", style=STATUS_STYLES.get(status, ""))
    return text if text else Text("no jobs", style="dim")


def print_json_lines(items: list[dict[str, Any]]) -> None:
    for item in items:
        typer.echo(json.dumps(item))


# -- values ----------------------------------------------------------------------------


def _shape(value: torch.Tensor | np.ndarray) -> str:
    return "[" + ", ".join(str(n) for n in value.shape) + "]"


def _dtype(value: torch.Tensor | np.ndarray) -> str:
    return str(value.dtype).removeprefix("torch.")


def _has_arrays(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_arrays(item) for item in value)
    if isinstance(value, dict):
        return any(_has_arrays(item) for item in value.values())
    return False


def brief(value: Any, width: int = 80) -> str:
    """A short description of a value: shape and dtype for arrays, repr for the rest."""
    if isinstance(value, torch.Tensor):
        text = f"Tensor{_shape(value)} {_dtype(value)}"
    elif isinstance(value, np.ndarray):
        text = f"ndarray{_shape(value)} {_dtype(value)}"
    elif isinstance(value, (list, tuple)) and _has_arrays(value):
        inner = ", ".join(brief(item, width) for item in value)
        text = f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
    elif isinstance(value, dict) and _has_arrays(value):
        text = "{" + ", ".join(f"{key!r}: {brief(item, width)}" for key, item in value.items()) + "}"
    else:
        text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def value_row(name: str, value: Any) -> list[str]:
    """NAME, TYPE, SHAPE, DTYPE, VALUE of one saved value."""
    kind = type(value).__name__
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return [name, kind, _shape(value), _dtype(value), ""]
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        kind = f"{kind} of {len(value)}"
    return [name, kind, "", "", brief(value)]


def flatten_tensors(saved: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor of the saved values by a dotted name (``hidden.0``), and what is not one."""
    flat: dict[str, torch.Tensor] = {}
    others: list[str] = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            # Own memory, contiguous: safetensors refuses views and shared storage.
            flat[name] = value.detach().to("cpu").contiguous().clone()
        elif isinstance(value, np.ndarray):
            flat[name] = torch.from_numpy(np.ascontiguousarray(value).copy())
        elif isinstance(value, (list, tuple)) and value and _has_arrays(value):
            for index, item in enumerate(value):
                visit(f"{name}.{index}", item)
        elif isinstance(value, dict) and value and all(isinstance(key, str) for key in value) and _has_arrays(value):
            for key, item in value.items():
                visit(f"{name}.{key}", item)
        else:
            others.append(f"{name} ({type(value).__name__})")

    for name, value in saved.items():
        visit(name, value)
    return flat, others


def check_out_file(path: Path) -> None:
    if path.suffix.lower() not in OUT_SUFFIXES:
        fail(
            f"cannot write {path}: choose the format by the file's suffix, .safetensors (tensors only) "
            "or .pt (anything, with torch.save)"
        )


def write_values(path: Path, saved: dict[str, Any], metadata: dict[str, str]) -> str:
    """Write saved values to ``path`` (format by suffix); returns what was written."""
    check_out_file(path)
    if path.suffix.lower() == ".safetensors":
        flat, others = flatten_tensors(saved)
        if others:
            fail(
                f"cannot write {path}: safetensors holds tensors only, and {', '.join(others)} "
                f"{'is' if len(others) == 1 else 'are'} not; write a .pt file instead"
            )
        from safetensors.torch import save_file

        try:
            save_file(flat, str(path), metadata=metadata)
        except Exception as error:  # an unsupported dtype, a full disk: one line, not a traceback
            fail(f"cannot write {path}: {error}")
        return f"{len(flat)} tensor{'s' if len(flat) != 1 else ''}"
    try:
        torch.save(dict(saved), path)
    except Exception as error:
        fail(f"cannot write {path}: {error}")
    return f"{len(saved)} value{'s' if len(saved) != 1 else ''}"


# -- errors and jobs ---------------------------------------------------------------------


def error_dict(error: ErrorInfo) -> dict[str, Any]:
    """A wire-format error as the API's error body."""
    return {
        "type": error.type,
        "message": error.message,
        "frames": [{"filename": f.filename, "line": f.line, "name": f.name, "source": f.source} for f in error.frames],
        "notes": list(error.notes),
    }


def error_text(error: dict[str, Any]) -> Text:
    """An error with the user's frames (innermost last) and notes."""
    text = Text()
    text.append(f"{error.get('type')}: {error.get('message')}", style="red")
    if error.get("reason"):
        text.append(f"  ({error['reason']})", style="dim")
    frames = error.get("frames") or []
    if frames:
        text.append("\n  in your code, innermost last:")
        for frame in frames:
            source = f": {frame['source'].strip()}" if frame.get("source") else ""
            text.append(f"\n    {frame.get('filename')}:{frame.get('line')} in {frame.get('name')}{source}")
    for note in error.get("notes") or []:
        text.append(f"\n  note: {note}")
    return text


def fields(rows: list[tuple[str, Any]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in rows:
        grid.add_row(label, value if isinstance(value, Text) else Text(str(value)))
    return grid


def show_job(out: Output, job: dict[str, Any]) -> None:
    status = styled(job["status"], STATUS_STYLES)
    if job.get("cancel_requested") and job["status"] not in FINAL:
        status.append(" (cancel requested)", style="yellow")
    rows: list[tuple[str, Any]] = [
        ("job", job["id"]),
        ("status", status),
        ("model", job.get("model", "-")),
        ("kind", f"{job.get('kind', '-')} (lane {job.get('lane', '-')})"),
    ]
    if job.get("batch_id"):
        rows.append(("batch", f"{job['batch_id']} item {job.get('batch_index')}"))
    rows += [
        ("attempts", job.get("attempts", "-")),
        ("created", when(job.get("created_at"))),
        ("started", when(job.get("started_at"))),
        ("finished", when(job.get("finished_at"))),
    ]
    timings = job.get("timings") or {}
    if timings:
        rows.append(("timings", ", ".join(f"{phase} {took:.3f} s" for phase, took in timings.items())))
    result = size(job.get("result_bytes"))
    if job.get("result_expired"):
        result += " (expired)"
    rows.append(("bytes", f"request {size(job.get('request_bytes'))}, result {result}"))
    if job.get("error"):
        rows.append(("error", error_text(job["error"])))
    out.print(fields(rows))
    events = job.get("events") or []
    if events:
        out.print(Text("history", style="bold"))
        history = Table.grid(padding=(0, 2))
        for event in events:
            change = Text(f"{event['from_status']} → " if event.get("from_status") else "")
            change.append(event["to_status"], style=STATUS_STYLES.get(event["to_status"], ""))
            history.add_row("", when(event.get("at")), change, Text(event.get("detail") or "", style="dim"))
        out.print(history)


def show_result(out: Output, result: Result) -> None:
    if result.logs:
        out.print(Text("printed", style="bold"))
        for line in result.logs:
            out.print(Text(f"  {line}"))
    if result.error is not None:
        out.print(Text("error ", style="bold") + error_text(error_dict(result.error)))
    if not result.saved:
        out.print(Text("no saved values", style="dim"))
        return
    grid = table("NAME", "TYPE", "SHAPE", "DTYPE", "VALUE")
    for name, value in result.saved.items():
        grid.add_row(*(Text(cell) for cell in value_row(name, value)))
    out.print(grid)


def _statuses(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    found = [item.strip().upper() for value in values for item in value.split(",") if item.strip()]
    unknown = [item for item in found if item not in STATUSES]
    if unknown:
        raise typer.BadParameter(f"{', '.join(unknown)}: choose from {', '.join(STATUSES)}", param_hint="--status")
    return found


@jobs_app.command("list")
def jobs_list(
    status: Annotated[
        list[str] | None,
        typer.Option("--status", "-s", help="Only jobs in this status (repeat, or comma-separate).", metavar="S"),
    ] = None,
    batch: Annotated[str | None, typer.Option("--batch", help="Only the jobs of this batch.", metavar="ID")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many jobs.")] = 20,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Your jobs, newest first."""
    statuses = _statuses(status)
    found: list[dict[str, Any]] = []
    with connect(api_url, api_key) as client:
        cursor = None
        while len(found) < limit:
            page = client.jobs(status=statuses, batch=batch, limit=min(500, limit - len(found)), cursor=cursor)
            found += page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
    if as_json:
        print_json_lines(found)
        return
    out = Output()
    if not found:
        out.print(Text("no jobs", style="dim"))
        return
    grid = table("ID", "STATUS", "MODEL", "KIND", "CREATED", "RUN (s)", "ERROR")
    for job in found:
        error = job.get("error") or {}
        grid.add_row(
            Text(job["id"][:12]),
            styled(job["status"], STATUS_STYLES),
            Text(job.get("model", "")),
            Text(job.get("kind", "")),
            when(job.get("created_at")),
            seconds((job.get("timings") or {}).get("run")),
            Text(error.get("type", ""), style="red" if error else ""),
        )
    out.print(grid)


@jobs_app.command("status")
def jobs_status(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait until the job has ended.")] = False,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """A job's status, timings, error (at your code's lines) and history."""
    with connect(api_url, api_key) as client:
        job = job_handles.Job(job_id, client)
        job.refresh()
        if wait:
            job.wait()  # its last answer is the whole final view, events included
    if as_json:
        typer.echo(json.dumps(job.info, indent=2))
        return
    show_job(Output(), job.info)


@jobs_app.command("result")
def jobs_result(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Write the values to FILE.safetensors or FILE.pt (a chat: FILE.json).", metavar="FILE"
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait until the job has ended.")] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """A job's saved values (names, types, shapes), what it printed, and its error."""
    if out is not None and out.suffix != ".json":
        check_out_file(out)
    with connect(api_url, api_key) as client:
        if wait:
            job = job_handles.Job(job_id, client)
            job.refresh()
            job.wait()
        data = client.download(client.result_link(job_id)["url"])
        if data.startswith(b"{"):  # a chat's result is its whole reply, as JSON
            reply = json.loads(data)
            if out is not None:
                out.write_text(json.dumps(reply, indent=2))
                typer.echo(f"wrote the reply ({len(reply['tokens'])} tokens) to {out}")
            else:
                typer.echo(reply["text"])
            return
        result = codec.decode_result(data)
    show_result(Output(), result)
    if result.error is not None:  # what it saved before failing is not its result
        fail(f"job {job_id} failed: {result.error.type}: {result.error.message}")
    if out is not None:
        written = write_values(out, result.saved, {"ndif_job": job_id})
        typer.echo(f"wrote {written} to {out}")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Cancel a job: at once if it has not started; a running one stops at its next check."""
    with connect(api_url, api_key) as client:
        info = client.cancel(job_id)
    status = info["status"]
    if status == "CANCELLED":
        typer.echo(f"job {job_id}: CANCELLED")
    elif status in FINAL:
        typer.echo(f"job {job_id} had already ended {status}; nothing to cancel")
    else:
        typer.echo(f"job {job_id}: cancel requested; it is {status} and stops at its next check")


# -- batches ---------------------------------------------------------------------------


def progress_line(info: dict[str, Any], width: int = 30) -> str:
    total = int(info.get("size") or 0)
    done = int(info.get("finished") or 0)
    share = float(info.get("progress") or 0.0)
    filled = round(width * share)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} ended ({share:.0%})"


@batch_app.command("list")
def batch_list(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=200, help="At most this many batches.")] = 20,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Your batch experiments, newest first."""
    with connect(api_url, api_key) as client:
        found = client.batches(limit=limit)
    if as_json:
        print_json_lines(found)
        return
    out = Output()
    if not found:
        out.print(Text("no batches", style="dim"))
        return
    grid = table("ID", "NAME", "SIZE", "ENDED", "JOBS", "CREATED")
    for batch in found:
        grid.add_row(
            Text(batch["id"][:12]),
            Text(batch.get("name") or "-"),
            str(batch.get("size", 0)),
            f"{batch.get('progress', 0.0):.0%}",
            counts_line(batch.get("counts") or {}),
            when(batch.get("created_at")),
        )
    out.print(grid)


@batch_app.command("status")
def batch_status(
    batch_id: Annotated[str, typer.Argument(help="The batch's id.")],
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait until every item has ended.")] = False,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """A batch's jobs per status and its progress."""
    from .batch import Batch

    with connect(api_url, api_key) as client:
        batch = Batch.get(batch_id, client)
        if wait:
            batch.wait(progress=sys.stderr.isatty())
        info = batch.info
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    out = Output()
    out.print(fields([("batch", info["id"]), ("name", info.get("name") or "-"), ("created", when(info["created_at"]))]))
    out.print(Text(progress_line(info)))
    out.print(counts_line(info.get("counts") or {}))


@batch_app.command("results")
def batch_results(
    batch_id: Annotated[str, typer.Argument(help="The batch's id.")],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write each finished item's values to DIR/item-NNNN.safetensors (or .pt if not all tensors).",
            metavar="DIR",
            file_okay=False,
        ),
    ] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Every item of a batch: its job, status, result size or error (partial while it runs)."""
    rows = []
    written = 0
    with connect(api_url, api_key) as client:
        listing = client.batch_results(batch_id)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        for item in listing["items"]:
            error = item.get("error")
            note = Text(f"{error['type']}: {error['message']}", style="red") if error else Text("")
            if out_dir is not None and item.get("url"):
                result = codec.decode_result(client.download(item["url"]))
                if result.error is not None:
                    note = Text(f"{result.error.type}: {result.error.message}", style="red")
                else:
                    _, others = flatten_tensors(result.saved)
                    path = out_dir / f"item-{item['index']:04d}{'.pt' if others else '.safetensors'}"
                    write_values(path, result.saved, {"ndif_job": item["job_id"], "ndif_batch": batch_id})
                    written += 1
                    note = Text(f"{path.name}: {', '.join(result.saved) or 'no saved values'}")
            rows.append((item, note))
    out = Output()
    grid = table("ITEM", "JOB", "STATUS", "RESULT", "ERROR / FILE")
    for item, note in rows:
        grid.add_row(
            str(item["index"]),
            Text(item["job_id"][:12]),
            styled(item["status"], STATUS_STYLES),
            size(item.get("bytes")) if item.get("url") else "-",
            note,
        )
    out.print(grid)
    ready = sum(1 for item, _ in rows if item.get("url"))
    failed = sum(1 for item, _ in rows if not item.get("url") and item["status"] in FINAL)
    pending = len(rows) - ready - failed
    out.print(Text(f"{ready} with results, {failed} ended without one, {pending} not ended"))
    if out_dir is not None:
        out.print(Text(f"wrote {written} file{'s' if written != 1 else ''} to {out_dir}"))


@batch_app.command("cancel")
def batch_cancel(
    batch_id: Annotated[str, typer.Argument(help="The batch's id.")],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Cancel every job of a batch that has not ended."""
    with connect(api_url, api_key) as client:
        info = client.cancel_batch(batch_id)
    out = Output()
    out.print(Text(f"batch {batch_id}: cancelled its unfinished jobs; now ") + counts_line(info.get("counts") or {}))


# -- models and keys -------------------------------------------------------------------


def list_models(api_url: str | None, api_key: str | None, as_json: bool) -> None:
    """The deployments, their state and their queues."""
    with connect(api_url, api_key) as client:
        found = client.models()
    if as_json:
        print_json_lines(found)
        return
    out = Output()
    if not found:
        out.print(Text("no models are deployed", style="dim"))
        return
    grid = table("MODEL", "BACKEND", "STATE", "REPLICAS", "QUEUED", "RUNNING", "ALIASES")
    for model in found:
        grid.add_row(
            Text(model["key"]),
            Text(model.get("backend", "")),
            styled(model.get("state", "unknown"), MODEL_STATE_STYLES),
            f"{model.get('replicas_ready', 0)}/{model.get('replicas', 0)}",
            str(model.get("queued", 0)),
            str(model.get("running", 0)),
            Text(", ".join(model.get("aliases") or [])),
        )
    out.print(grid)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who the key is for.")],
    admin: Annotated[bool, typer.Option("--admin", help="The key may create keys.")] = False,
    quota_queued: Annotated[int | None, typer.Option(min=0, help="Jobs waiting at once.", metavar="N")] = None,
    quota_running: Annotated[int | None, typer.Option(min=1, help="Jobs running at once.", metavar="N")] = None,
    quota_result_bytes: Annotated[int | None, typer.Option(min=0, help="Bytes of stored results.", metavar="N")] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Create an API key (with an admin key) and print its secret, shown this once."""
    with connect(api_url, api_key) as client:
        new = client.create_key(
            name,
            admin=admin,
            quota_queued=quota_queued,
            quota_running=quota_running,
            quota_result_bytes=quota_result_bytes,
        )
    typer.echo(new["key"])
    kind = "admin key" if new.get("admin") else "key"
    typer.echo(f"created {kind} {new['id']} for {new['name']}; the service shows the secret only this once", err=True)
    typer.echo(f"use it with: export NDIF_API_KEY={new['key']}", err=True)


# -- chat ----------------------------------------------------------------------------------------


def _scale(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name, float(value) if value else 1.0
    except ValueError:
        fail(f"--steer takes NAME or NAME=SCALE (a number), not {text!r}")


def chat(
    model: str,
    message: str,
    steer: list[str] | None,
    probe: str | None,
    norm: int | None,
    max_tokens: int,
    temperature: float,
    as_json: bool,
    api_url: str | None,
    api_key: str | None,
) -> None:
    """Stream one steered reply; each token is shaded by the chosen probe (or norm)."""
    observe: dict[str, Any] = {}
    watched = None
    if probe:
        observe["probes"] = [{"probe": probe}]
        watched = probe
    elif norm is not None:
        observe["norms"] = [norm]
        watched = f"norm:{norm}"
    body = {
        "model": model,
        "messages": [{"role": "user", "content": message}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ndif": {"steer": [{"vector": n, "scale": s} for n, s in map(_scale, steer or [])], "observe": observe},
    }
    out = Output()
    tokens: list[dict[str, Any]] = []
    with connect(api_url, api_key) as client:
        for chunk in client.chat_stream(body):
            content = chunk["choices"][0]["delta"].get("content", "") if chunk.get("choices") else ""
            step = chunk.get("ndif")
            if step is None:  # text with no token of its own (held back near a stop sequence)
                if content and tokens:
                    tokens[-1]["text"] += content
                continue
            step = {**step, "text": content}
            tokens.append(step)
            if as_json:
                typer.echo(json.dumps(step))
    if as_json:
        return
    values = [t["observations"].get(watched) for t in tokens] if watched else []
    numbers = [v for v in values if isinstance(v, (int, float))]
    top = max((abs(v) for v in numbers), default=0.0) or 1.0
    text = Text()
    for index, token in enumerate(tokens):
        value = values[index] if values else None
        if isinstance(value, (int, float)):
            shade = value if watched == probe else abs(value) / top
            level = int(40 + 180 * max(0.0, min(1.0, shade)))
            text.append(token["text"], style=f"on rgb({level},40,40)" if level > 40 else "")
        else:
            text.append(token["text"])
    out.print(text)
    if watched and numbers:
        out.print(Text(f"{watched}: " + " ".join(f"{v:.2f}" for v in numbers), style="dim"))
