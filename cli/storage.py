"""`tfgrid storage put|get|check|repair|rm|ls`: the grid object store from the command line.

Objects are encrypted and erasure-coded (16 of 20) onto storage namespaces on distinct nodes by
:class:`threebot.storage.client.StorageClient`, acting as the home's identity; this module
only parses arguments, shows progress and renders the results (design §7):

- ``put FILE`` prints ``{"cap","size","k","n","nodes":[...]}`` (plus ``verify_cap``);
- ``get CAP -o OUT`` writes OUT only once the whole object authenticated (never a partial file);
- ``check CAP`` prints ``{"cap","healthy","needed","total","shards":[{"index","node","state"}]}``;
- ``repair CAP`` regenerates missing or corrupt shards, onto replacement nodes when theirs is gone;
- ``rm CAP`` deletes every shard on every node; ``ls`` lists what this home stored.

Long transfers show a progress bar on stderr, only when stderr is a terminal. The bar counts the
bytes that cross the shard-store connections (a counting stream under the client), so it needs
nothing from the client's internals. Errors are the client's one-line messages (e.g. "only 15 of
the 16 shards needed are reachable (nodes ...)") and a non-zero exit.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import click
import trio

from cli import chain
from cli.gridstore import clock_us, index_path
from cli.home import Home
from cli.output import emit, human_age, human_bytes, json_option, progress, progress_done, table
from threebot.storage.client import StorageClient
from threebot.storage.errors import StorageError
from threebot.storage.grid import LedgerGrid
from threebot.storage.index import LocalIndex
from threebot.storage.shardclient import Connector, open_tcp

RENDER_INTERVAL_S = 0.1
RATE_WINDOW_S = 3.0
BAR_WIDTH = 24


class Progress:
    """A transfer's progress line: bytes moved so far against an expected total (None when
    unknown: then only the amount and the rate show). The rate is over the last few seconds,
    so the time spent placing namespaces before the first byte does not drag it down.
    Rendering is throttled and goes to stderr only on a terminal (:func:`cli.output.progress`)."""

    def __init__(self, label: str, total: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = total
        self.moved = 0
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque([(clock(), 0)])
        self._last = 0.0
        progress(f"{label}: contacting the grid")

    def add(self, n: int) -> None:
        self.moved += n
        now = self._clock()
        if now - self._last >= RENDER_INTERVAL_S:
            self._last = now
            self._samples.append((now, self.moved))
            while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
                self._samples.popleft()
            progress(self.line(now))

    def line(self, now: float) -> str:
        t0, moved0 = self._samples[0]
        rate = (self.moved - moved0) / max(now - t0, 1e-3)
        amount = f"{human_bytes(self.moved)} at {human_bytes(int(rate))}/s"
        if not self.total:
            return f"{self.label}: {amount}"
        frac = min(1.0, self.moved / self.total)
        filled = int(frac * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return f"{self.label} [{bar}] {frac * 100:3.0f}% {amount}"

    def done(self) -> None:
        progress_done()


class CountingStream(trio.abc.HalfCloseableStream):
    """A stream that reports every byte it sends or receives to ``count``."""

    def __init__(self, inner: trio.abc.Stream, count: Callable[[int], None]) -> None:
        self._inner = inner
        self._count = count

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)
        self._count(len(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._inner.receive_some(max_bytes)
        self._count(len(data))
        return data

    async def send_eof(self) -> None:
        if isinstance(self._inner, trio.abc.HalfCloseableStream):
            await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


def counting_connector(count: Callable[[int], None], inner: Connector = open_tcp) -> Connector:
    async def connect(host: str, port: int) -> trio.abc.Stream:
        return CountingStream(await inner(host, port), count)

    return connect


@asynccontextmanager
async def open_store(home: Home, meter: Progress | None = None) -> AsyncIterator[StorageClient]:
    """The home's storage client; ``meter`` counts the shard traffic.

    Raises :class:`~ledger.errors.ConfigError` when the home has no context or identity.
    """
    key = home.load_identity()
    genesis = home.load_genesis()
    connect = open_tcp if meter is None else counting_connector(meter.add)
    async with chain.open_client(home) as ledger:
        grid = LedgerGrid(ledger, genesis, key, os.urandom)
        yield StorageClient(grid, key, LocalIndex(index_path(home)), random_bytes=os.urandom,
                            clock_us=clock_us, connect=connect)


# -- rendering -------------------------------------------------------------------------------------


def _put_human(d: dict[str, Any]) -> str:
    return "\n".join([
        d["cap"],
        f"  {human_bytes(d['size'])} stored as {d['n']} shards ({d['k']} needed) on nodes "
        f"{', '.join(str(n) for n in d['nodes'])}",
        f"  verify capability (check/repair, cannot read): {d['verify_cap']}",
    ])


def _check_human(d: dict[str, Any]) -> str:
    state = ("healthy" if d["healthy"] == d["total"]
             else "degraded" if d["healthy"] >= d["needed"] else "UNREADABLE")
    head = (f"{state}: {d['healthy']} of {d['total']} shards ok "
            f"({d['needed']} needed to read)")
    bad = [s for s in d["shards"] if s["state"] != "ok"]
    if not bad:
        return head
    return "\n".join([head, table(bad, [("index", "shard"), ("node", "node"), ("state", "state"),
                                        ("detail", "detail")])])


def _repair_human(d: dict[str, Any]) -> str:
    lines = [f"{d['healthy']} of {d['total']} shards healthy (was {d['healthy_before']}), "
             f"manifest revision {d['revision']}"]
    lines += [f"  shard {m['index']}: node {m['from']} -> node {m['to']}" for m in d["moved"]]
    lines += [f"  shard {i}: rewritten in place" for i in d["rewritten"]]
    if not d["moved"] and not d["rewritten"]:
        lines.append("  nothing to repair")
    return "\n".join(lines)


def _ls_human(rows: list[dict[str, Any]]) -> str:
    now_ms = clock_us() // 1000
    shown = [{**r, "size": human_bytes(r["size"]), "created": human_age(r["created"], now_ms)}
             for r in rows]
    return table(shown, [("name", "name"), ("size", "size"), ("created", "stored"),
                         ("cap", "capability")], empty="(no objects)")


# -- commands ------------------------------------------------------------------------------------


@click.group()
def storage() -> None:
    """The grid object store: encrypted, erasure-coded (16 of 20) objects on distinct nodes."""


@storage.command()
@json_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Name in `storage ls` [default: the file's name].")
@click.pass_context
def put(ctx: click.Context, file: Path, name: str | None) -> None:
    """Store FILE on the grid and print its capability (keep it: it is the only key)."""
    home = chain.home_of(ctx)
    size = file.stat().st_size

    async def go() -> dict[str, Any]:
        meter = Progress(f"put {file.name}", None)
        try:
            async with open_store(home, meter) as client:
                p = client.settings.params
                meter.total = p.n * p.shard_bytes(size)
                result = await client.put(file, name=name)
        finally:
            meter.done()
        return result.doc()

    emit(ctx, chain.run(go), _put_human)


@storage.command()
@json_option
@click.argument("cap")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), default=None,
              help="Where to write the object (a file, or a directory to write it into) "
                   "[default: its stored name, when this home stored it].")
@click.pass_context
def get(ctx: click.Context, cap: str, output: Path | None) -> None:
    """Read the object of read capability CAP into a file (written whole, or not at all)."""
    home = chain.home_of(ctx)
    entry = next((e for e in LocalIndex(index_path(home)).entries() if e.cap == cap), None)
    if output is None:
        if entry is None:
            raise click.UsageError("this home does not know the object's name: pass -o OUT")
        output = Path(Path(entry.name).name)
    elif output.is_dir():
        if entry is None:
            raise click.UsageError(f"{output} is a directory and the object's name is unknown: "
                                   "pass -o DIR/NAME")
        output = output / Path(entry.name).name

    async def go() -> int:
        meter = Progress(f"get {output.name}", None)
        try:
            async with open_store(home, meter) as client:
                if entry is not None:
                    p = client.settings.params
                    meter.total = p.n * p.shard_bytes(entry.size)
                return await client.get(cap, output)
        finally:
            meter.done()

    size = chain.run(go)
    emit(ctx, {"cap": cap, "size": size, "path": str(output.absolute())},
         lambda d: f"wrote {human_bytes(d['size'])} to {d['path']}")


@storage.command()
@json_option
@click.argument("cap")
@click.option("--deep", is_flag=True,
              help="Also read every block of every shard and check it against its hash.")
@click.pass_context
def check(ctx: click.Context, cap: str, deep: bool) -> None:
    """Health of every shard of CAP (a read or verify capability): ok, missing, corrupt or
    unreachable, and how many are healthy of how many needed."""
    home = chain.home_of(ctx)

    async def go() -> dict[str, Any]:
        async with open_store(home) as client:
            return (await client.check(cap, deep=deep)).doc()

    emit(ctx, chain.run(go), _check_human)


@storage.command()
@json_option
@click.argument("cap")
@click.option("--deep", is_flag=True, help="Find corrupt blocks by reading every block first.")
@click.pass_context
def repair(ctx: click.Context, cap: str, deep: bool) -> None:
    """Regenerate the missing or corrupt shards of CAP (in place, or on replacement nodes
    when theirs is gone). Only the object's owner can repair it."""
    home = chain.home_of(ctx)

    async def go() -> dict[str, Any]:
        meter = Progress("repair", None)
        try:
            async with open_store(home, meter) as client:
                return (await client.repair(cap, deep=deep)).doc()
        finally:
            meter.done()

    emit(ctx, chain.run(go), _repair_human)


@storage.command()
@json_option
@click.argument("cap")
@click.pass_context
def rm(ctx: click.Context, cap: str) -> None:
    """Delete every shard of CAP on every node and forget it locally. Fails, naming the
    nodes, when some could not be reached (run it again later)."""
    home = chain.home_of(ctx)

    async def go() -> dict[str, Any]:
        async with open_store(home) as client:
            return (await client.rm(cap)).doc()

    doc = chain.run(go)
    if doc["failed"]:
        nodes = ", ".join(f"{f['node']} ({f['reason']})" for f in doc["failed"])
        raise StorageError(f"deleted the records on {doc['deleted']} placements, but not on "
                           f"nodes {nodes}: run `tfgrid storage rm` again when they are back")
    emit(ctx, doc, lambda d: f"removed: {d['deleted']} placements deleted, "
                             f"{len(d['cancelled'])} namespaces cancelled")


@storage.command(name="ls")
@json_option
@click.pass_context
def ls_cmd(ctx: click.Context) -> None:
    """The objects this home stored (and has not removed), oldest first."""
    home = chain.home_of(ctx)
    entries = sorted(LocalIndex(index_path(home)).entries(), key=lambda e: e.created_ms)
    emit(ctx, [e.doc() for e in entries], _ls_human)
