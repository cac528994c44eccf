"""`tfgrid image push DIR_OR_TAR`: publish a rootfs image where nodes can fetch it.

Images are content-addressed tars (``sha256:<hex>`` of the tar bytes). For now they are
published into the home's image directory (``HOME/images/<hex>.tar``) and offered as
``file://`` sources, which the node agents of a devnet on the same machine read directly;
nodes verify the digest before unpacking, so a source is never trusted. (A later issue adds
grid storage as a source.)
"""

from __future__ import annotations

from pathlib import Path

import click

from cli import chain
from cli.home import Home
from cli.output import emit, json_option
from zos_agent.images import parse_image, push_image

IMAGES_DIR = "images"


def images_dir(home: Home) -> Path:
    return home.root / IMAGES_DIR


def local_sources(home: Home, image: str) -> list[str]:
    """The sources of ``image`` if it was pushed into this home; ``[]`` otherwise.

    Raises :class:`ImageError` (a TfgridError) if ``image`` is not ``sha256:<hex>``.
    """
    blob = images_dir(home) / f"{parse_image(image)}.tar"
    return [blob.resolve().as_uri()] if blob.is_file() else []


@click.group()
def image() -> None:
    """Container images: content-addressed rootfs tars."""


@image.command()
@json_option
@click.argument("src", metavar="DIR_OR_TAR",
                type=click.Path(exists=True, path_type=Path))
@click.pass_context
def push(ctx: click.Context, src: Path) -> None:
    """Publish a rootfs (a directory or a tar) and print its reference (sha256:...)."""
    home = chain.home_of(ctx)
    ref, sources = push_image(src, images_dir(home))
    emit(ctx, {"image": ref, "sources": sources},
         lambda d: f"{d['image']}\n  sources: {', '.join(d['sources'])}")
