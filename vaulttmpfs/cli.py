"""Operator commands (click). Thin: each command parses flags and calls the logic elsewhere."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """vaulttmpfs: FlexVolume driver giving each pod its own wrapped Vault token.

    The kubelet calls `vaulttmpfs init|mount|unmount`; the commands below are for operators.
    """


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(__version__)


@cli.command("retry-revocations")
def retry_revocations() -> None:
    """Retry pod-token revocations that unmount queued while Vault was unreachable."""
    from . import driver
    from .config import Config

    result = driver.retry_pending(Config.from_env())
    click.echo(f"revoked {result['revoked']}, still pending {result['pending']}")
    if result["pending"]:
        raise SystemExit(1)


def main(argv: list[str]) -> int:
    from .errors import DriverError

    try:
        cli.main(args=argv, prog_name="vaulttmpfs", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except DriverError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0
