"""`distill view RUN_DIR`: a local, read-only web page over a run directory: the generated rows
(kept, rejected and why, failed) with search and filters, each row's provenance, nearest kept
neighbours and judgements (raw replies included); every eval question with each model's answer
and the style verdicts; training curves and model cards; and the gap report with its numbers
linking to the rows behind them.

Starlette (the ASGI toolkit FastAPI is built on) serves server-rendered Jinja pages through
uvicorn: a handful of read-only HTML routes needs no API schema, no form handling, no JavaScript.
The data lives in a SQLite index in a temporary directory (``distill.view_index``); the run
directory is only ever read. It binds to 127.0.0.1 unless told otherwise, and then checks the Host
header (a web page elsewhere can't reach it by DNS rebinding).
"""

from __future__ import annotations

import html
import ipaddress
import json
import math
import mimetypes
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from distill.errors import DistillError
from distill.paths import RunLayout
from distill.report import flatten
from distill.runstore import MANIFEST
from distill.stats import pct
from distill.view_index import EVAL_FILTER_NAMES, EVAL_FILTERS, RowFilter, RunIndex, complete_rows, source_files

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1"]
VERDICTS = ("A", "tie", "B", "invalid")  # pairwise style verdicts: student preferred, tie, teacher preferred
CHARTS = (  # (title, metrics.jsonl keys drawn in it): TRL's log names
    ("loss", ("loss", "eval_loss")),
    ("reward", ("reward",)),
    ("KL to the reference", ("kl",)),
    ("groups without reward variance", ("frac_reward_zero_std",)),
    ("KD: KL to the teacher and cross-entropy", ("kd/kl", "kd/ce")),
    ("KD: the KL term's share of the loss", ("kd/kl_share",)),
)
MAX_FILES = 2000  # the files page lists at most this many


class Viewer:
    """The pages of one run directory. Endpoints are plain functions: Starlette runs them in a
    thread pool, and each query opens its own SQLite connection."""

    def __init__(self, run_dir: Path, index: RunIndex):
        self.run_dir = run_dir
        self.layout = RunLayout(run_dir)
        self.index = index
        self.lock = threading.Lock()

    def page(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        from distill_prompts import render

        def link(path: str = "", **changes: Any) -> str:
            """This page's query with ``changes`` (None or "" drops a parameter), or ``path`` with them."""
            merged = {} if path else dict(request.query_params)
            merged.update(changes)
            query = urlencode({k: v for k, v in merged.items() if v not in (None, "")})
            return (path or request.url.path) + (f"?{query}" if query else "")

        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        text = render(
            f"view/{template}",
            run_dir=str(self.run_dir),
            path=request.url.path,
            here=here,
            link=link,
            stale=self.index.stale(),
            pct=pct,
            **context,
        )
        return HTMLResponse(text, status_code=status_code)

    # Pages -------------------------------------------------------------------------------------

    def home(self, request: Request) -> Response:
        has_report = (self.layout.report / "report.json").is_file()
        return RedirectResponse("/report" if has_report else "/data", status_code=303)

    def data(self, request: Request) -> Response:
        try:
            filters = RowFilter.from_params(request.query_params)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        page, size = paging(request, 50)
        total, rows = self.index.rows_page(filters, (page - 1) * size, size)
        return self.page(
            request,
            "data.html.jinja",
            filters=filters,
            total=total,
            rows=rows,
            facets=self.index.facets(),
            pager=pager(page, size, total),
            skipped=self.index.skipped_lines(),
        )

    def row(self, request: Request) -> Response:
        found = self.index.row(request.path_params["row_id"])
        if found is None:
            raise HTTPException(404, f"no row {request.path_params['row_id']!r} in this run")
        provenance = found["data"].get("provenance")
        return self.page(
            request, "row.html.jinja", row=found, provenance=flatten(provenance) if isinstance(provenance, dict) else []
        )

    def eval(self, request: Request) -> Response:
        params = request.query_params
        tasks, models = self.index.tasks(), self.index.models()
        task, model = params.get("task", ""), params.get("model", "")
        show, verdict = params.get("filter", ""), params.get("verdict", "")
        problems = [
            f"{name}: unknown {value!r}"
            for name, value, allowed in (
                ("task", task, tasks),
                ("model", model, [m["name"] for m in models]),
                ("filter", show, list(EVAL_FILTERS)),
                ("verdict", verdict, VERDICTS),
            )
            if value and value not in allowed
        ]
        if problems:
            raise HTTPException(400, "; ".join(problems))
        page, size = paging(request, 20)
        total, questions = self.index.eval_page(task, model, show, verdict, (page - 1) * size, size)
        counts = {name: self.index.eval_count(task, model, name) for name in EVAL_FILTERS}
        counts.update({f"verdict:{v}": self.index.eval_count(task, model, verdict=v) for v in VERDICTS})
        return self.page(
            request,
            "eval.html.jinja",
            tasks=tasks,
            models=models,
            task=task,
            model=model,
            show=show,
            verdict=verdict,
            filter_names=EVAL_FILTER_NAMES,
            counts=counts,
            total=total,
            questions=questions,
            pager=pager(page, size, total),
        )

    def training(self, request: Request) -> Response:
        stages = []
        for stage in ("sft", "kd", "rl"):
            directory = self.layout.adapter(stage)
            if directory is None or not directory.is_dir():
                continue
            skipped: list[tuple[str, int, str]] = []
            metrics = list(complete_rows(directory / "metrics.jsonl", self.index.workspace, skipped))
            charts = [chart for title, keys in CHARTS if (chart := metric_chart(f"{stage}: {title}", metrics, keys))]
            summary = read_json(directory / "training_summary.json")
            card = directory / "README.md"
            stages.append(
                {
                    "name": stage,
                    "steps": len(metrics),
                    "skipped": len(skipped),
                    "charts": [markup(c) for c in charts],
                    "summary": flatten(summary) if summary else [],
                    "card": markup(render_markdown(card.read_text(encoding="utf-8", errors="replace")))
                    if card.is_file()
                    else None,
                }
            )
        return self.page(request, "training.html.jinja", stages=stages)

    def report(self, request: Request) -> Response:
        report = read_json(self.layout.report / "report.json")
        generate = read_json(self.layout.generate / MANIFEST)
        judge = read_json(self.layout.judge / "judge_summary.json")
        facets = self.index.facets()
        if generate is not None:
            data, finished = generate.get("summary", {}), True
        else:  # generate has not finished: count what its files hold so far
            kinds: dict[str, dict[str, int]] = {"rejected": {}, "failed": {}}
            for r in facets["reasons"]:
                kinds[r["status"]][r["reason_kind"]] = r["n"]
            data, finished = {"kept": facets["status"].get("kept", 0), **kinds}, False
        return self.page(
            request,
            "report.html.jinja",
            report=report,
            data=data,
            data_finished=finished,
            judge=judge,
            has_static=(self.layout.report / "report.html").is_file(),
            static_path=relative(self.layout.report / "report.html", self.run_dir),
            eval_count=self.index.eval_count,
        )

    def files(self, request: Request) -> Response:
        listed, more = [], False
        for folder, directories, names in os.walk(self.run_dir):
            directories.sort()
            for name in sorted(names):
                path = Path(folder) / name
                if len(listed) >= MAX_FILES:
                    more = True
                    break
                if path.is_file():
                    listed.append((relative(path, self.run_dir), path.stat().st_size))
        return self.page(request, "files.html.jinja", files=listed, more=more, max_files=MAX_FILES)

    def raw(self, request: Request) -> Response:
        """A file of the run directory, as text (HTML pages sandboxed); nothing outside it."""
        path = inside(self.run_dir, request.path_params["path"])
        if path is None:
            raise HTTPException(403, "not a file inside the run directory")
        headers = {"X-Content-Type-Options": "nosniff"}
        kind = mimetypes.guess_type(path.name)[0] or ""
        if path.suffix == ".html":  # distill's own report: shown, but without scripts or outside requests
            headers["Content-Security-Policy"] = "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:"
            return FileResponse(path, media_type="text/html; charset=utf-8", headers=headers)
        if kind.startswith("image/") and not kind.endswith("svg+xml"):
            return FileResponse(path, media_type=kind, headers=headers)
        textual = path.suffix in {".json", ".jsonl", ".md", ".txt", ".yaml", ".yml", ".csv", ".log", ".jinja"}
        media = "text/plain; charset=utf-8" if textual else "application/octet-stream"
        return FileResponse(path, media_type=media, headers=headers)

    def reindex(self, request: Request) -> Response:
        with self.lock:  # one rebuild at a time; pages keep reading the old index meanwhile
            self.index.rebuild()
        target = request.query_params.get("next", "/")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"  # only a page of this app, never another site
        return RedirectResponse(target, status_code=303)

    async def error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        return self.page(request, "error.html.jinja", status_code=status, status=status, detail=detail)


def create_app(run_dir: Path, index: RunIndex | None = None, allowed_hosts: list[str] | None = None) -> Starlette:
    """The viewer app of ``run_dir`` (its index built now unless given). ``allowed_hosts``: the
    Host header values served (None: any, for tests and --expose)."""
    run_dir = run_dir.resolve()
    viewer = Viewer(run_dir, index or RunIndex(run_dir))
    routes = [
        Route("/", viewer.home),
        Route("/data", viewer.data),
        Route("/data/{row_id}", viewer.row),
        Route("/eval", viewer.eval),
        Route("/training", viewer.training),
        Route("/report", viewer.report),
        Route("/files", viewer.files),
        Route("/raw/{path:path}", viewer.raw),
        Route("/reindex", viewer.reindex, methods=["POST"]),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: viewer.error})
    app.state.index = viewer.index
    return app


# Helpers ---------------------------------------------------------------------------------------


def paging(request: Request, default: int) -> tuple[int, int]:
    """(page, page size) from ?page= and ?per_page= (1..500)."""
    try:
        page = max(1, int(request.query_params.get("page", 1)))
        size = min(500, max(1, int(request.query_params.get("per_page", default))))
    except ValueError:
        raise HTTPException(400, "page and per_page must be whole numbers") from None
    return page, size


def pager(page: int, size: int, total: int) -> dict[str, int]:
    pages = max(1, math.ceil(total / size))
    return {"page": page, "pages": pages, "size": size, "total": total, "first": (page - 1) * size + 1}


def inside(run_dir: Path, relative_path: str) -> Path | None:
    """The file ``relative_path`` names inside ``run_dir``, or None: ``..``, absolute paths and
    symlinks that lead out of the run directory are refused."""
    if "\x00" in relative_path:
        return None
    root = run_dir.resolve()
    candidate = (root / relative_path).resolve()
    if candidate != root and root not in candidate.parents:
        return None
    return candidate if candidate.is_file() else None


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else ""


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or not (yet) JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def markup(text: str) -> Any:
    from markupsafe import Markup

    return Markup(text)  # our own SVG / markdown-it's output, its text already escaped


def render_markdown(text: str) -> str:
    """A model card as HTML: its YAML header as a block, the Markdown with raw HTML escaped."""
    from markdown_it import MarkdownIt

    header = ""
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        front, text = text[4:].split("\n---\n", 1)
        header = f'<pre class="front-matter">{html.escape(front)}</pre>'
    return header + MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def metric_chart(title: str, metrics: list[dict[str, Any]], keys: tuple[str, ...]) -> str | None:
    series = {
        key: [
            (float(row["step"]), float(row[key]))
            for row in metrics
            if isinstance(row.get(key), (int, float))
            and isinstance(row.get("step"), (int, float))
            and math.isfinite(row[key])
        ]
        for key in keys
    }
    series = {key: points for key, points in series.items() if points}
    return line_chart(title, series) if series else None


def line_chart(title: str, series: dict[str, list[tuple[float, float]]]) -> str:
    """Lines over training steps as inline SVG (no plotting library), every point with a tooltip."""
    width, height, left, right, top, bottom = 560, 270, 64, 12, 46, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) or 1) * 0.5, y1 + (abs(y1) or 1) * 0.5

    def at(x: float, y: float) -> tuple[float, float]:
        return left + plot_w * (x - x0) / (x1 - x0), top + plot_h * (1 - (y - y0) / (y1 - y0))

    colours = ["#4C78A8", "#F58518", "#54A24B", "#B279A2"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" role="img">',
        f"<title>{html.escape(title)}</title>",
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
    ]
    for k in range(5):
        value = y0 + (y1 - y0) * k / 4
        _, y = at(x0, value)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{value:.4g}</text>')
    for value in sorted({x0, (x0 + x1) / 2, x1} if x1 - x0 >= 2 else {x0, x1}):
        x, _ = at(value, y0)
        label = f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle" font-size="11">{value:g}</text>'
        parts.append(label)
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" font-size="11">step</text>')
    for number, (name, points) in enumerate(series.items()):
        colour = colours[number % len(colours)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (at(*p) for p in points))
        parts.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for step, value in points if len(points) <= 200 else ():
            x, y = at(step, value)
            tip = html.escape(f"{name} at step {step:g}: {value:.6g}")
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"><title>{tip}</title></circle>')
        legend_x = left + number * 150  # the legend between the title and the plot, never over a line
        parts.append(f'<rect x="{legend_x}" y="{top - 18}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="{top - 9}" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# Serving ---------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """A clear error for a port in use (before minutes of indexing, not after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise DistillError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port") from None


def serve(
    run_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    expose: bool = False,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> None:
    """Index ``run_dir`` and serve the viewer until Ctrl-C; the index is deleted on exit."""
    import uvicorn

    run_dir = run_dir.resolve()
    local = is_loopback(host)
    if not local and not expose:
        raise DistillError(
            f"--host {host}: the run's data (prompts, answers, verdicts) would be readable by other machines; "
            "add --expose to do that on purpose, or leave --host at 127.0.0.1"
        )
    found = [p for p in source_files(run_dir) if p.is_file()]
    layout = RunLayout(run_dir)
    if not found and not any(d.is_dir() for d in (layout.sft, layout.rl, layout.eval)):
        raise DistillError(f"{run_dir}: no distill outputs here (instructions.jsonl, judge/, eval/, sft/, rl/)")
    check_port(host, port)
    started = time.perf_counter()
    index = RunIndex(run_dir)
    stats = index.stats
    unreadable = f" ({stats['skipped']} unreadable lines left out)" if stats["skipped"] else ""
    echo(
        f"indexed {stats['rows']:,} rows, {stats['predictions']:,} eval answers and {stats['style']:,} style verdicts "
        f"in {time.perf_counter() - started:.1f} s{unreadable}"
    )
    if not local:
        warn(f"warning: serving {run_dir} to the network on {host}:{port}; anyone who can reach it can read the run")
    shown = f"[{host}]" if ":" in host else host
    echo(f"distill view: http://{shown}:{port}/  (read-only; Ctrl-C stops)")
    app = create_app(run_dir, index, allowed_hosts=LOOPBACK_NAMES if local and host != "::1" else None)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        index.close()
