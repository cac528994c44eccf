"""Output for scripts (one JSON document on stdout) or for people (short tables).

Commands build one JSON-able document and, for people, say how to render it. Colours only
appear on a terminal (click strips them otherwise).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

_JSON_META = "tfgrid.json"
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Settings:
    """Global options, stored as the root click context's ``obj``."""

    home: Path
    json: bool
    debug: bool


def settings(ctx: click.Context) -> Settings:
    obj = ctx.find_root().obj
    if not isinstance(obj, Settings):  # only when a command is invoked outside the `tfgrid` group
        raise click.UsageError("tfgrid commands must run under the tfgrid group")
    return obj


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_JSON_META] = True


def json_option(f: _F) -> _F:
    """``--json`` on a subcommand, equivalent to ``tfgrid --json``."""
    return click.option(
        "--json", "json_flag", is_flag=True, expose_value=False, callback=_set_json,
        is_eager=True, help="Print one JSON document on stdout.",
    )(f)


def want_json(ctx: click.Context) -> bool:
    return settings(ctx).json or bool(ctx.meta.get(_JSON_META))


def emit(ctx: click.Context, doc: Any, human: Callable[[Any], str] | None = None) -> None:
    """Print ``doc`` as JSON (``--json``) or through ``human`` (default: key/value lines)."""
    if want_json(ctx):
        click.echo(json.dumps(doc, indent=2))
        return
    text = human(doc) if human is not None else pairs(doc)
    if text:
        click.echo(text)


def pairs(doc: Any) -> str:
    """A mapping as aligned ``key  value`` lines."""
    if not isinstance(doc, dict):
        return str(doc)
    width = max((len(k) for k in doc), default=0)
    return "\n".join(f"{click.style(k.ljust(width), bold=True)}  {_cell(v)}"
                     for k, v in doc.items())


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]],
          empty: str = "(none)") -> str:
    """Rows as a plain table; ``columns`` are ``(key, heading)`` pairs."""
    if not rows:
        return empty
    cells = [[_cell(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    head = "  ".join(h.upper().ljust(w) for (_, h), w in zip(columns, widths, strict=True))
    lines = [click.style(head.rstrip(), bold=True)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list | tuple):
        return ", ".join(_cell(x) for x in v) if v else "-"
    return str(v)


def progress(message: str) -> None:
    """A one-line progress indicator on stderr, only when stderr is a terminal."""
    if sys.stderr.isatty():
        click.echo(f"\r\033[K{message}", err=True, nl=False)


def progress_done() -> None:
    if sys.stderr.isatty():
        click.echo("\r\033[K", err=True, nl=False)


def human_bytes(n: int | None) -> str:
    """``1.5 GiB``-style sizes for people (JSON always carries exact byte counts)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def human_age(then_ms: int | None, now_ms: int) -> str:
    """How long ago ``then_ms`` was, as ``12s ago`` / ``3m ago`` / ``never``."""
    if not then_ms:
        return "never"
    s = max(0, (now_ms - then_ms) // 1000)
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    return f"{s // 3600}h ago"
