"""Operator commands (click). Thin: each command parses flags and calls the logic elsewhere."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """vaulttmpfs: FlexVolume driver giving each pod its own wrapped Vault token.

    The kubelet calls `vaulttmpfs init|mount|unmount`; the commands below are for operators.
    """


def _setting(name: str, default: str):
    """A click default read from the environment, else the config file (click's envvar sees only the former)."""

    def read() -> str:
        import os

        if name in os.environ:  # even empty: "" turns a listener off
            return os.environ[name]
        from .config import setting

        return setting(name, default)

    return read


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(__version__)


@cli.command("retry-revocations")
def retry_revocations() -> None:
    """Retry pod-token revocations that unmount queued while Vault was unreachable."""
    from .engine import operation as driver
    from .config import Config

    result = driver.retry_pending(Config.from_env())
    click.echo(f"revoked {result['revoked']}, still pending {result['pending']}")
    if result["pending"]:
        raise SystemExit(1)


class _Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        from .config import parse_duration
        from .errors import DriverError

        if isinstance(value, (int, float)):
            return float(value)
        if value == "":
            return None  # unset: the command's own default
        try:
            seconds = parse_duration(value, param.opts[0] if param else "duration")
        except DriverError as exc:
            self.fail(str(exc), param, ctx)
        if seconds <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return seconds


@cli.command()
@click.option("--plugin-dir", envvar="VAULTTMPFS_PLUGIN_DIR",
              default=_setting("VAULTTMPFS_PLUGIN_DIR", "/usr/libexec/kubernetes/kubelet-plugins/volume/exec"),
              help="The kubelet's --volume-plugin-dir (VAULTTMPFS_PLUGIN_DIR) "
                   "[default: /usr/libexec/kubernetes/kubelet-plugins/volume/exec].")
@click.option("--source", type=click.Path(exists=True, file_okay=False),
              help="Bundle dir to install [default: the running bundle, or dist/vaulttmpfs].")
@click.option("--config-from", envvar="VAULTTMPFS_CONFIG_FROM", type=click.Path(exists=True, file_okay=False),
              help="Also write the node's config file (VAULTTMPFS_CONFIG_FILE) from this dir: the DaemonSet's "
                   "ConfigMap mounted as a volume (VAULTTMPFS_CONFIG_FROM).")
def install(plugin_dir: str, source: str | None, config_from: str | None) -> None:
    """Install the driver into the kubelet's plugin dir, atomically; a no-op if already installed."""
    from .ops import install as installer

    if config_from:
        from .config import config_file_path
        from .ops import configfile

        dest = config_file_path()
        click.echo(f"config file {dest}: {configfile.write(config_from, dest)} from {config_from}")

    try:
        result = installer.install(plugin_dir, source or installer.default_source())
    except OSError as exc:
        raise click.ClickException(f"install into {plugin_dir} failed: {exc}") from None
    pruned = f", pruned {', '.join(result['pruned'])}" if result["pruned"] else ""
    click.echo(f"{result['action']}: {result['path']} -> {result['bundle']}{pruned}")


# Each agent flag's default comes from its VAULTTMPFS_* variable, in the environment or the config file.
@cli.command()
@click.option("--renew-interval", type=_Duration(), envvar="VAULTTMPFS_RENEW_INTERVAL",
              default=_setting("VAULTTMPFS_RENEW_INTERVAL", ""),
              help="Renew the generator token this often (VAULTTMPFS_RENEW_INTERVAL) [default: half its period/TTL].")
@click.option("--retry-interval", type=_Duration(), envvar="VAULTTMPFS_RETRY_INTERVAL",
              default=_setting("VAULTTMPFS_RETRY_INTERVAL", "60s"),
              help="Retry queued revocations this often (VAULTTMPFS_RETRY_INTERVAL) [default: 60s].")
@click.option("--health-addr", envvar="VAULTTMPFS_HEALTH_ADDR",
              default=_setting("VAULTTMPFS_HEALTH_ADDR", "127.0.0.1:9829"),
              help="host:port for GET /healthz and /livez; empty to disable (VAULTTMPFS_HEALTH_ADDR) "
                   "[default: 127.0.0.1:9829].")
@click.option("--metrics-addr", envvar="VAULTTMPFS_METRICS_ADDR",
              default=_setting("VAULTTMPFS_METRICS_ADDR", "127.0.0.1:9830"),
              help="host:port for GET /metrics (Prometheus); empty to disable (VAULTTMPFS_METRICS_ADDR) "
                   "[default: 127.0.0.1:9830].")
@click.option("--relay/--no-relay", envvar="VAULTTMPFS_RELAY",
              default=_setting("VAULTTMPFS_RELAY", "false"),
              help="Also do the driver's mount/unmount for it over VAULTTMPFS_AGENT_SOCKET (fast path; needs "
                   "a privileged agent with the kubelet's pods dir mounted with Bidirectional propagation) "
                   "(VAULTTMPFS_RELAY) [default: off].")
@click.option("--csi-endpoint", envvar="VAULTTMPFS_CSI_ENDPOINT", metavar="unix:///PATH",
              default=_setting("VAULTTMPFS_CSI_ENDPOINT", ""),
              help="Also serve the CSI node plugin (driver vaulttmpfs.cloudwatt.com) on this unix socket, e.g. "
                   "unix:///csi/csi.sock (needs the same privileges and mount propagation as --relay).")
@click.option("--csi-jwt-auth-mount", envvar="VAULTTMPFS_CSI_JWT_AUTH_MOUNT", metavar="MOUNT",
              default=_setting("VAULTTMPFS_CSI_JWT_AUTH_MOUNT", ""),
              help="CSI: pods log in to Vault themselves with the service-account token the kubelet hands over "
                   "(CSIDriver tokenRequests), at auth/MOUNT (a jwt or kubernetes method); Vault's role (the "
                   "volume's vault/role) decides the policies. Default: tokens are minted with the generator token.")
@click.option("--csi-jwt-audience", envvar="VAULTTMPFS_CSI_JWT_AUDIENCE",
              default=_setting("VAULTTMPFS_CSI_JWT_AUDIENCE", "vault"),
              help="CSI: the tokenRequests audience whose token is used to log in [default: vault].")
def agent(renew_interval: float | None, retry_interval: float, health_addr: str, metrics_addr: str,
          relay: bool, csi_endpoint: str | None, csi_jwt_auth_mount: str | None, csi_jwt_audience: str) -> None:
    """Run the node agent: renew the generator token, retry revocations, serve health. Stop with SIGTERM."""
    from .node import agent as node_agent
    from . import log
    from .config import Config

    config = Config.from_env()
    log.get(config.log_file, component="agent").info(
        "agent starting", renew_interval=renew_interval, retry_interval=retry_interval, health_addr=health_addr,
        vault_addr=config.vault_addr, generator_token_path=config.generator_token_path,
        relay=config.agent_socket if relay else None, csi_endpoint=csi_endpoint, csi_jwt_auth_mount=csi_jwt_auth_mount)
    jwt_login = None
    if csi_endpoint and csi_jwt_auth_mount:
        from .csi.servicers import JwtLogin

        jwt_login = JwtLogin(_auth_mount(csi_jwt_auth_mount), csi_jwt_audience)
    services = node_agent.services(config, renew_interval, retry_interval, relay, csi_endpoint or None, jwt_login,
                                   metrics_addr=metrics_addr or None)
    node_agent.Agent(services, health_addr or None, settings=config.public()).run()
    log.get().info("agent stopped")


def _auth_mount(text: str) -> str:
    """A Vault auth mount path: plain segments (`jwt`, `k8s/prod`), nothing that could climb out of auth/."""
    from .config import SAFE_NAME

    segments = text.strip("/").split("/")
    if not all(SAFE_NAME.fullmatch(s) and s not in (".", "..") for s in segments):
        raise click.BadParameter(f"{text!r} is not a Vault auth mount path (e.g. jwt)", param_hint="--csi-jwt-auth-mount")
    return "/".join(segments)


@cli.command()
@click.option("--token-path", help="Write the token here [default: $VAULTTMPFS_GENERATOR_TOKEN_PATH, "
              "else /etc/vaulttmpfs/vaulttoken].")
@click.option("--policy", default="token_generator", show_default=True, help="The generator token's only policy.")
@click.option("--period", help="Renewal period of generator tokens; --setup-vault writes it into the generator "
              "role [default: the role's, 24h as shipped].")
@click.option("--username", help="LDAP username [default: asked on the terminal].")
@click.option("--password-file", type=click.Path(dir_okay=False),
              help="Read the LDAP password from this file [default: asked on the terminal, else read from stdin].")
@click.option("--ldap-mount", default="ldap", show_default=True, help="Path of Vault's LDAP auth method (auth/<mount>).")
@click.option("--force", is_flag=True, help="Replace a generator token that is still live (the old one is revoked; "
              "any other live token is left alone and refused).")
@click.option("--setup-vault", is_flag=True,
              help="First write the generator policy and the token roles from policies/ (idempotent; needs a Vault "
              "operator's token with the vaulttmpfs-setup policy).")
@click.option("--policies-dir", type=click.Path(file_okay=False),
              help="Where --setup-vault reads policies/ from [default: the one shipped with vaulttmpfs].")
def bootstrap(token_path, policy, period, username, password_file, ldap_mount, force, setup_vault, policies_dir):
    """Give this node its generator token, logging in with VAULT_TOKEN if set, else with LDAP.

    The token is an orphan, periodic, with only the generator policy, written 0600. It is never
    printed; root tokens are refused.
    """
    import os

    from .ops import bootstrap as node_bootstrap
    from .config import Config

    config = Config.from_env()
    options = node_bootstrap.Options(
        token_path=token_path or config.generator_token_path, policy=policy, period=period, force=force,
        setup_vault=setup_vault, policies_dir=policies_dir, ldap_mount=ldap_mount)
    result = node_bootstrap.bootstrap(config, options, os.environ.get("VAULT_TOKEN"),
                                      _ldap_credentials(username, password_file))
    for line in node_bootstrap.summary(result):
        click.echo(line)


def _ldap_credentials(username: str | None, password_file: str | None):
    """Asked only if bootstrap gets to the LDAP login: prompts on a terminal (password hidden);
    for automation, --username plus the password from --password-file or stdin."""

    def ask() -> tuple[str, str]:
        import sys

        on_terminal = sys.stdin.isatty()
        if not username and not on_terminal:
            raise click.UsageError("no terminal to ask on: pass --username, and the LDAP password on stdin "
                                   "or with --password-file (or set VAULT_TOKEN)")
        if password_file:
            try:
                with open(password_file, encoding="utf-8") as handle:
                    password = handle.readline().rstrip("\r\n")
            except OSError as exc:
                raise click.ClickException(f"cannot read --password-file {password_file}: {exc.strerror}") from None
        elif not on_terminal:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = None
        name = username or click.prompt("LDAP username")
        if password is None:
            password = click.prompt("LDAP password", hide_input=True)
        return name, password

    return ask


@cli.command()
@click.option("--volume", "volume_dir", default="/var/run/secrets/vaulttmpfs", show_default=True,
              envvar="VAULTTMPFS_VOLUME", help="Where the vaulttmpfs volume is mounted (env VAULTTMPFS_VOLUME).")
@click.option("--out", "out_dir", default="/var/run/vault", show_default=True, envvar="VAULTTMPFS_OUT",
              help="Write the token here: a shared emptyDir with medium Memory (env VAULTTMPFS_OUT).")
@click.option("--renew", is_flag=True, envvar="VAULTTMPFS_RENEW",
              help="Then keep the token alive until SIGTERM; exit non-zero once it cannot be renewed.")
@click.option("--renew-fraction", type=click.FloatRange(0.05, 0.95), default=0.5, show_default=True,
              help="Renew when this fraction of the token's TTL has passed.")
@click.option("--revoke-on-exit", is_flag=True, envvar="VAULTTMPFS_REVOKE_ON_EXIT",
              help="With --renew: revoke the token on SIGTERM (the volume's unmount revokes it too).")
def token(volume_dir: str, out_dir: str, renew: bool, renew_fraction: float, revoke_on_exit: bool) -> None:
    """In the pod: unwrap the volume's token once and write it to --out for the pod's tools.

    Files: `token` (Vault/OpenBao Agent token_file, consul-template, VAULT_TOKEN) and
    `kubernetes-vault.json` (vault-sidekick, AUTH_FORMAT=kubernetes-vault). A restarted container
    reuses the token already written. Needs VAULT_ADDR; logs JSON lines to stderr.
    """
    from .pod import token as pod_token

    if revoke_on_exit and not renew:
        raise click.UsageError("--revoke-on-exit needs --renew (only a running sidecar sees the pod stop)")
    options = pod_token.Options(volume_dir=volume_dir, out_dir=out_dir, renew=renew, revoke_on_exit=revoke_on_exit,
                                renew_fraction=renew_fraction)
    raise SystemExit(pod_token.run(options))


@cli.command("renew-generator")
def renew_generator() -> None:
    """Renew this node's generator token (cron); fails, saying what to do, when it is expired or revoked."""
    from .ops import bootstrap as node_bootstrap
    from .config import Config

    click.echo(node_bootstrap.renew_summary(node_bootstrap.renew_generator(Config.from_env())))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@click.option("--health-addr", default=_setting("VAULTTMPFS_HEALTH_ADDR", "127.0.0.1:9829"),
              help="The agent's health endpoint [default: $VAULTTMPFS_HEALTH_ADDR, else 127.0.0.1:9829].")
@click.option("--kubelet-pid", type=int, help="Take the driver's environment from this process "
              "[default: the process named kubelet, else this command's environment].")
def doctor(as_json: bool, health_addr: str, kubelet_pid: int | None) -> None:
    """Check this node, read-only: one line per check, each FAIL with its fix; exit 1 on any FAIL."""
    from .ops import doctor as node_doctor

    checks = node_doctor.run(health_addr=health_addr or None, kubelet_pid=kubelet_pid)
    result = node_doctor.report(checks)
    if as_json:
        import json

        click.echo(json.dumps(result, indent=2))
    else:
        for check in checks:
            click.echo(check.line())
    if not result["ok"]:
        raise SystemExit(1)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def status(as_json: bool) -> None:
    """The volumes this node holds and the revocations it still owes (from the state dir, no Vault call)."""
    from .ops import status as node_status
    from .config import Config

    report = node_status.collect(Config.from_env())
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))
    else:
        for line in node_status.render(report):
            click.echo(line)


@cli.command()
@click.option("--plugin-dir", envvar="VAULTTMPFS_PLUGIN_DIR",
              default=_setting("VAULTTMPFS_PLUGIN_DIR", "/usr/libexec/kubernetes/kubelet-plugins/volume/exec"),
              help="The kubelet's --volume-plugin-dir (VAULTTMPFS_PLUGIN_DIR).")
@click.option("--keep-token", is_flag=True, help="Leave the node's generator token alive (e.g. to reinstall).")
def uninstall(plugin_dir: str, keep_token: bool) -> None:
    """Remove the driver from this node: refused while a volume is mounted; revokes the generator token."""
    from .ops import uninstall as remover
    from .config import Config

    result = remover.uninstall(Config.from_env(), plugin_dir, revoke=not keep_token)
    for line in remover.summary(result):  # nothing imported from here on: the bundle may be gone
        click.echo(line)


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
