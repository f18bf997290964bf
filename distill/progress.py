"""Progress bars and summary tables (rich), kept out of the stage code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class GenerateProgress:
    """kept/target bar with rejected and failed counts, tokens/s and ETA."""

    def __init__(self, target: int, enabled: bool = True):
        self.progress = Progress(
            TextColumn("[bold]generate"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} kept"),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.task = self.progress.add_task("generate", total=target, detail="")

    def __enter__(self) -> GenerateProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, state: Any, seconds: float) -> None:
        rate = state.usage.completion_tokens / seconds if seconds > 0 else 0.0
        detail = (
            f"rejected {sum(state.rejected.values())}  failed {sum(state.failed.values())}  "
            f"requests {state.requests}  {rate:.0f} tok/s"
        )
        self.progress.update(self.task, completed=len(state.kept), detail=detail)


def print_generate_summary(summary: dict[str, Any], run_dir: Path | None) -> None:
    table = Table(title=f"distill generate → {run_dir}", show_header=False)
    table.add_row(
        "kept", f"{summary['kept']} / {summary['target']}" + ("" if summary["complete"] else "  (budget ran out)")
    )
    table.add_row(
        "requests",
        f"{summary['requests']} ({summary['sent_to_teacher']} sent, {summary['from_cache']} "
        f"cached, {summary['replayed_from_log']} replayed)",
    )
    for reason, count in sorted(summary["rejected"].items()):
        table.add_row(f"rejected: {reason}", str(count))
    for reason, count in sorted(summary["failed"].items()):
        table.add_row(f"failed: {reason}", str(count))
    usage = summary["usage"]
    table.add_row("tokens", f"{usage['prompt_tokens']} prompt, {usage['completion_tokens']} completion")
    if summary["cost_usd"] is not None:
        table.add_row("cost", f"${summary['cost_usd']:.4f}")
    table.add_row("time", f"{summary['seconds']} s")
    Console().print(table)
