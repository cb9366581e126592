"""Progress bars and status lines for long jobs (rich, on stderr so stdout stays parseable)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextmanager
def progress_bar(
    description: str, total: int, enabled: bool = True
) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; ``fields`` (e.g. loss=0.3) are shown beside the bar."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: float) -> None:
            info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
            progress.update(task, advance=n, **({"info": info} if fields else {}))

        yield advance


def say(message: str) -> None:
    console.print(message, highlight=False)
