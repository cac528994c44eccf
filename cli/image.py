"""`tfgrid image push DIR_OR_TAR`: publish a rootfs image where nodes can fetch it.

Images are content-addressed tars (``sha256:<hex>`` of the tar bytes). ``push`` stores the tar
in grid storage (16-of-20 erasure-coded, like any object; ``bot run`` keeps it repaired) and
offers its read capability (``tfs:...``) as the first source; node agents read it through
``python -m threebot.storage.fetch``. The tar is also kept in the home's image directory
(``HOME/images/<hex>.tar``): on a devnet, whose agents share this machine, its ``file://`` URL
follows as a fallback source. ``--local`` skips grid storage (a grid without storage nodes).
Nodes verify the digest before unpacking, so no source is ever trusted.

The sources of each pushed image are remembered in ``HOME/images/<hex>.json``, which is where
``deploy`` finds them for the images a manifest names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cli import chain
from cli.gridstore import open_storage
from cli.home import Home, write_json
from cli.output import emit, json_option
from zos_agent.images import GRID_SCHEME, parse_image, push_image

IMAGES_DIR = "images"


def images_dir(home: Home) -> Path:
    return home.root / IMAGES_DIR


def _record(home: Home, hexdigest: str) -> Path:
    return images_dir(home) / f"{hexdigest}.json"


def local_sources(home: Home, image: str) -> list[str]:
    """The sources of ``image`` if it was pushed from this home; ``[]`` otherwise.

    Raises :class:`ImageError` (a TfgridError) if ``image`` is not ``sha256:<hex>``.
    """
    hexdigest = parse_image(image)
    try:
        doc = json.loads(_record(home, hexdigest).read_text())
        sources = doc["sources"] if doc.get("image") == image else None
        if isinstance(sources, list) and all(isinstance(s, str) for s in sources):
            return list(sources)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no record (pushed before records existed, or by hand): the blob alone
    blob = images_dir(home) / f"{hexdigest}.tar"
    return [blob.resolve().as_uri()] if blob.is_file() else []


async def _store_in_grid(home: Home, blob: Path, image: str) -> str:
    """The read capability of ``image`` in grid storage: the one stored by an earlier push
    from this home while the home still holds it, else a new upload."""
    async with open_storage(home) as storage:
        held = {e.cap for e in storage.ls()}
        for source in local_sources(home, image):
            if source.startswith(GRID_SCHEME) and source in held:
                return source
        result = await storage.put(blob, name=f"image {image}")
    return result.cap


@click.group()
def image() -> None:
    """Container images: content-addressed rootfs tars."""


@image.command()
@json_option
@click.option("--local", is_flag=True,
              help="Only publish into this home (file:// source; for a devnet without storage).")
@click.argument("src", metavar="DIR_OR_TAR",
                type=click.Path(exists=True, path_type=Path))
@click.pass_context
def push(ctx: click.Context, src: Path, local: bool) -> None:
    """Store a rootfs (a directory or a tar) in grid storage; print its reference and sources.

    The first source is the grid-storage read capability (tfs:...); on a devnet the tar's
    file:// URL follows as a fallback.
    """
    home = chain.home_of(ctx)
    ref, files = push_image(src, images_dir(home))
    sources: list[str] = []
    if not local:
        blob = images_dir(home) / f"{parse_image(ref)}.tar"
        sources.append(chain.run(lambda: _store_in_grid(home, blob, ref)))
    if local or home.devnet_file.exists():
        sources += files
    doc: dict[str, Any] = {"image": ref, "sources": sources}
    write_json(_record(home, parse_image(ref)), doc, mode=0o600)  # a read capability
    emit(ctx, doc, lambda d: f"{d['image']}\n  sources: {', '.join(d['sources'])}")
