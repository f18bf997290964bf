"""Progress bars and summary tables (rich), kept out of the stage code. One bar for every stage:
done / total with a unit, a free-text detail (rates, counts), elapsed time and ETA, on stderr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class StageProgress:
    """A progress bar for one stage (generate, judge, eval, train). Use as a context manager, or
    ``start()`` / ``stop()``; ``enabled=False`` shows nothing."""

    def __init__(self, label: str, total: int | None, unit: str, enabled: bool = True):
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            TextColumn(f"{{task.completed}}/{{task.total}} {unit}"),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.task = self.progress.add_task(label, total=total, detail="")

    def start(self) -> StageProgress:
        self.progress.start()
        return self

    def stop(self) -> None:
        self.progress.stop()

    def __enter__(self) -> StageProgress:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def update(self, completed: int, detail: str = "", total: int | None = None) -> None:
        fields: dict[str, Any] = {"completed": completed, "detail": detail}
        if total is not None:
            fields["total"] = total
        self.progress.update(self.task, **fields)


def generate_detail(state: Any, seconds: float) -> str:
    """The detail of generate's bar: rejected and failed counts, requests, tokens/s."""
    rate = state.usage.completion_tokens / seconds if seconds > 0 else 0.0
    return (
        f"rejected {sum(state.rejected.values())}  failed {sum(state.failed.values())}  "
        f"requests {state.requests}  {rate:.0f} tok/s"
    )


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
    cost = summary.get("cost")
    if cost is not None:  # from the ledger: per model, "price unknown" rather than $0
        for entry in cost["models"] or [{"model": "", "text": cost["text"]}]:
            table.add_row(f"cost {entry['model']}".strip(), entry["text"])
    elif summary["cost_usd"] is not None:
        table.add_row("cost", f"${summary['cost_usd']:.4f}")
    table.add_row("time", f"{summary['seconds']} s")
    Console().print(table)
