"""`tfgrid`: the command line of the grid.

Errors are one line on stderr and a non-zero exit; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import NoReturn

import click

from cli import (
    account,
    bot,
    capacity,
    context,
    contract,
    deploy,
    devnet,
    farm,
    identity,
    image,
    ledger_cmd,
    node,
    storage,
    twin,
)
from cli.output import Settings
from ledger.errors import TfgridError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="TFGRID_HOME",
              default=lambda: Path.home() / ".tfgrid",
              help="Directory with the context (ledger peers) and the identity "
              "[env TFGRID_HOME; default ~/.tfgrid].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="tfgrid", prog_name="tfgrid")
@click.pass_context
def cli(ctx: click.Context, home: Path, as_json: bool, debug: bool) -> None:
    """A decentralized grid: a BFT ledger, farms and nodes, and the 3Bots that use them."""
    ctx.obj = Settings(home=home.expanduser(), json=as_json, debug=debug)


for _group in (ledger_cmd.ledger, context.context, identity.identity, account.account,
               twin.twin, farm.farm, node.node, deploy.deploy, contract.contract,
               image.image, capacity.capacity, devnet.devnet, storage.storage,
               bot.bot):
    cli.add_command(_group)


def _leaf(exc: BaseException) -> BaseException:
    """The exception that matters inside (possibly nested) exception groups from trio."""
    while isinstance(exc, BaseExceptionGroup):
        inner = exc.exceptions
        ours = [e for e in inner if isinstance(_leaf(e), TfgridError | click.ClickException)]
        exc = ours[0] if ours else inner[0]
    return exc


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tfgrid`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    # --debug must work even when parsing itself fails, so look for it before click does.
    debug = "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args
    try:
        rv = cli.main(args=args, prog_name="tfgrid", standalone_mode=False)
    except BaseException as raised:  # noqa: BLE001 - this is the top-level error boundary
        exc = _leaf(raised)
        if isinstance(exc, SystemExit):
            raise exc from None
        if isinstance(exc, click.exceptions.NoArgsIsHelpError):
            click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
            sys.exit(EXIT_USAGE)
        if debug:
            traceback.print_exception(raised)
        if isinstance(exc, click.UsageError):
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            _fail(f"{exc.format_message()}{hint}", EXIT_USAGE)
        if isinstance(exc, click.ClickException):
            _fail(exc.format_message(), exc.exit_code or EXIT_ERROR)
        if isinstance(exc, TfgridError):
            _fail(str(exc) or type(exc).__name__, EXIT_ERROR)
        if isinstance(exc, KeyboardInterrupt | click.Abort):
            _fail("interrupted", EXIT_INTERRUPTED)
        if isinstance(exc, OSError):
            _fail(str(exc), EXIT_ERROR)
        _fail(f"internal error: {type(exc).__name__}: {exc}"
              + ("" if debug else " (rerun with --debug for the traceback)"), EXIT_INTERNAL)
    if isinstance(rv, int) and not isinstance(rv, bool):
        sys.exit(rv)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"tfgrid: error: {_one_line(message)}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
