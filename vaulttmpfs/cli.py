"""Operator commands (click). Thin: each command parses flags and calls the logic elsewhere.

Each command imports its own logic when it runs: all of it at once costs every command ~250 ms
(measured on this 2-core machine at load 17), paid by the pod's `vaulttmpfs token` and `version` too.
"""

from __future__ import annotations

import json
import os
import sys

import click

from . import __version__, log
from .config import SAFE_NAME, Config, config_file_path, parse_duration, settings
from .errors import DriverError


class Settings:
    """`ctx.obj`: the command's settings (the environment over the config file), read once when a
    command first needs them, and its Config and log built from them once; commands get them
    handed down, as vault-csi-provider's main.go builds config and logger once. `version`,
    `install`, `token` and `doctor` build no Config (doctor compares the driver's and the agent's)."""

    def __init__(self) -> None:
        self._values: dict[str, str] | None = None
        self._config: Config | None = None

    def value(self, name: str, default: str) -> str:
        """A flag's default: `name` from the environment (even empty: "" turns a listener off), else the file."""
        if name in os.environ:
            return os.environ[name]
        return self._settings().get(name) or default

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = Config.from_settings(self._settings())
            log.configure(self._config)
        return self._config

    def _settings(self) -> dict[str, str]:
        if self._values is None:
            self._values = settings()
        return self._values


pass_config = click.make_pass_decorator(Settings, ensure=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """vaulttmpfs: FlexVolume driver giving each pod its own wrapped Vault token.

    The kubelet calls `vaulttmpfs init|mount|unmount`; the commands below are for operators.
    """
    ctx.ensure_object(Settings)


def setting_option(*decls: str, env: str, default: str, **kwargs):
    """A flag set by `env` in the environment, else in the config file (click's envvar sees only
    the former), else `default`."""

    def read() -> str:
        return click.get_current_context().ensure_object(Settings).value(env, default)

    return click.option(*decls, envvar=env, default=read, **kwargs)


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(__version__)


@cli.command("retry-revocations")
@pass_config
def retry_revocations(obj: Settings) -> None:
    """Retry pod-token revocations that unmount queued while Vault was unreachable."""
    from .engine import operation as driver

    result = driver.retry_pending(obj.config)
    waiting = f" ({result['waiting']} kept by a rotation until the pod takes its new token)" \
        if result["waiting"] else ""
    click.echo(f"revoked {result['revoked']}, still pending {result['pending']}{waiting}")
    if result["pending"] > result["waiting"]:
        raise SystemExit(1)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only print what would be revoked and why; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@pass_config
def reconcile(obj: Settings, dry_run: bool, as_json: bool) -> None:
    """Once: revoke the tokens of volumes whose pod dir the kubelet removed without calling unmount.

    The node agent does this on a schedule; this is for nodes without it (cron). Exits 1 when a
    revocation had to be queued or a volume could not be examined.
    """
    from .engine import reconcile as reconciler

    result = reconciler.reconcile(obj.config, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        for line in reconciler.summary(result):
            click.echo(line)
    if result["queued"] or result["errors"]:
        raise SystemExit(1)


class _Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
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
@setting_option("--plugin-dir", env="VAULTTMPFS_PLUGIN_DIR", default=Config.plugin_dir,
                help="The kubelet's --volume-plugin-dir (VAULTTMPFS_PLUGIN_DIR) "
                   "[default: /usr/libexec/kubernetes/kubelet-plugins/volume/exec].")
@click.option("--source", type=click.Path(exists=True, file_okay=False),
              help="Bundle dir to install [default: the running bundle, or dist/vaulttmpfs].")
@click.option("--config-from", envvar="VAULTTMPFS_CONFIG_FROM", type=click.Path(exists=True, file_okay=False),
              help="Also write the node's config file (VAULTTMPFS_CONFIG_FILE) from this dir: the DaemonSet's "
                   "ConfigMap mounted as a volume (VAULTTMPFS_CONFIG_FROM).")
def install(plugin_dir: str, source: str | None, config_from: str | None) -> None:
    """Install the driver into the kubelet's plugin dir, atomically; a no-op if already installed."""
    from .ops import configfile
    from .ops import install as installer

    # A ConfigMap the driver would refuse is refused before anything on the node changes; the file
    # is written once the bundle is in place, so a failed install leaves the node's config as it was.
    config_text = configfile.render(config_from) if config_from else None
    try:
        result = installer.install(plugin_dir, source or installer.default_source())
    except OSError as exc:
        raise click.ClickException(f"install into {plugin_dir} failed: {exc}") from None
    pruned = f", pruned {', '.join(result['pruned'])}" if result["pruned"] else ""
    click.echo(f"{result['action']}: {result['path']} -> {result['bundle']}{pruned}")
    if config_text is not None:
        dest = config_file_path()
        click.echo(f"config file {dest}: {configfile.write(config_text, dest)} from {config_from}")


# Each agent flag's default comes from its VAULTTMPFS_* variable, in the environment or the config file.
@cli.command()
@setting_option("--renew-interval", type=_Duration(), env="VAULTTMPFS_RENEW_INTERVAL", default="",
                help="Renew the generator token this often (VAULTTMPFS_RENEW_INTERVAL) [default: half its period/TTL].")
@setting_option("--retry-interval", type=_Duration(), env="VAULTTMPFS_RETRY_INTERVAL", default="60s",
                help="Retry queued revocations this often (VAULTTMPFS_RETRY_INTERVAL) [default: 60s].")
@setting_option("--reconcile-interval", type=_Duration(), env="VAULTTMPFS_RECONCILE_INTERVAL", default="60s",
                help="Revoke the tokens of volumes whose pod dir is gone this often, and at start "
                     "(VAULTTMPFS_RECONCILE_INTERVAL) [default: 60s].")
@setting_option("--inventory-interval", type=_Duration(), env="VAULTTMPFS_INVENTORY_INTERVAL", default="5m",
                help="Look up the node's pod tokens in Vault (lookup-accessor) this often, and at start, for "
                     "`vaulttmpfs status` and /metrics (VAULTTMPFS_INVENTORY_INTERVAL) [default: 5m].")
@setting_option("--health-addr", env="VAULTTMPFS_HEALTH_ADDR", default="127.0.0.1:9829",
                help="host:port for GET /healthz and /livez; empty to disable (VAULTTMPFS_HEALTH_ADDR) "
                     "[default: 127.0.0.1:9829].")
@setting_option("--metrics-addr", env="VAULTTMPFS_METRICS_ADDR", default="127.0.0.1:9830",
                help="host:port for GET /metrics (Prometheus); empty to disable (VAULTTMPFS_METRICS_ADDR) "
                     "[default: 127.0.0.1:9830].")
@setting_option("--broker/--no-broker", env="VAULTTMPFS_BROKER", default="false",
                help="Make the driver calls' Vault requests for them over VAULTTMPFS_BROKER_SOCKET (the fast path of "
                     "the plain DaemonSet: no privilege or mount propagation needed; the driver still mounts) "
                     "(VAULTTMPFS_BROKER) [default: off].")
@setting_option("--relay/--no-relay", env="VAULTTMPFS_RELAY", default="false",
                help="Also do the driver's mount/unmount for it over VAULTTMPFS_AGENT_SOCKET (fast path; needs "
                     "a privileged agent with the kubelet's pods dir mounted with Bidirectional propagation) "
                     "(VAULTTMPFS_RELAY) [default: off].")
@setting_option("--csi-endpoint", env="VAULTTMPFS_CSI_ENDPOINT", default="", metavar="unix:///PATH",
                help="Also serve the CSI node plugin (driver vaulttmpfs.cloudwatt.com) on this unix socket, e.g. "
                     "unix:///csi/csi.sock (needs the same privileges and mount propagation as --relay).")
@setting_option("--csi-jwt-auth-mount", env="VAULTTMPFS_CSI_JWT_AUTH_MOUNT", default="", metavar="MOUNT",
                help="CSI: pods log in to Vault themselves with the service-account token the kubelet hands over "
                     "(CSIDriver tokenRequests), at auth/MOUNT (a jwt or kubernetes method); Vault's role (the "
                     "volume's vault/role) decides the policies. Default: tokens are minted with the generator "
                     "token.")
@setting_option("--csi-jwt-audience", env="VAULTTMPFS_CSI_JWT_AUDIENCE", default="vault",
                help="CSI: the tokenRequests audience whose token is used to log in [default: vault].")
@pass_config
def agent(obj: Settings, renew_interval: float | None, retry_interval: float, reconcile_interval: float,
          inventory_interval: float, health_addr: str, metrics_addr: str, broker: bool, relay: bool,
          csi_endpoint: str | None,
          csi_jwt_auth_mount: str | None, csi_jwt_audience: str) -> None:
    """Run the node agent: renew the generator token, retry and reconcile revocations, serve health.

    Stop with SIGTERM.
    """
    from .node import agent as node_agent

    config = obj.config
    log.get(component="agent").info(
        "agent starting", renew_interval=renew_interval, retry_interval=retry_interval,
        reconcile_interval=reconcile_interval, health_addr=health_addr,
        vault_addr=config.vault_addr, generator_token_path=config.generator_token_path,
        broker=config.broker_socket if broker else None, relay=config.agent_socket if relay else None,
        csi_endpoint=csi_endpoint, csi_jwt_auth_mount=csi_jwt_auth_mount)
    jwt_login = None
    if csi_endpoint and csi_jwt_auth_mount:
        from .csi.servicers import JwtLogin

        jwt_login = JwtLogin(_auth_mount(csi_jwt_auth_mount), csi_jwt_audience)
    services = node_agent.services(config, renew_interval, retry_interval, relay, csi_endpoint or None, jwt_login,
                                   metrics_addr=metrics_addr or None, reconcile_interval=reconcile_interval,
                                   broker=broker, inventory_interval=inventory_interval)
    node_agent.Agent(services, health_addr or None, settings=config.public()).run()
    log.get().info("agent stopped")


def _auth_mount(text: str) -> str:
    """A Vault auth mount path: plain segments (`jwt`, `k8s/prod`), nothing that could climb out of auth/."""
    segments = text.strip("/").split("/")
    if not all(SAFE_NAME.fullmatch(s) and s not in (".", "..") for s in segments):
        raise click.BadParameter(f"{text!r} is not a Vault auth mount path (e.g. jwt)",
                                 param_hint="--csi-jwt-auth-mount")
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
@click.option("--ldap-mount", default="ldap", show_default=True,
              help="Path of Vault's LDAP auth method (auth/<mount>).")
@click.option("--force", is_flag=True, help="Replace a generator token that is still live (the old one is revoked; "
              "any other live token is left alone and refused).")
@click.option("--setup-vault", is_flag=True,
              help="First write the generator policy and the token roles from policies/ (idempotent; needs a Vault "
              "operator's token with the vaulttmpfs-setup policy).")
@click.option("--policies-dir", type=click.Path(file_okay=False),
              help="Where --setup-vault reads policies/ from [default: the one shipped with vaulttmpfs].")
@pass_config
def bootstrap(obj: Settings, token_path, policy, period, username, password_file, ldap_mount, force, setup_vault,
              policies_dir):
    """Give this node its generator token, logging in with VAULT_TOKEN if set, else with LDAP.

    The token is an orphan, periodic, with only the generator policy, written 0600. It is never
    printed; root tokens are refused.
    """
    from .ops import bootstrap as node_bootstrap

    config = obj.config
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
@pass_config
def renew_generator(obj: Settings) -> None:
    """Renew this node's generator token (cron); fails, saying what to do, when it is expired or revoked."""
    from .ops import bootstrap as node_bootstrap

    click.echo(node_bootstrap.renew_summary(node_bootstrap.renew_generator(obj.config)))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@setting_option("--health-addr", env="VAULTTMPFS_HEALTH_ADDR", default="127.0.0.1:9829",
                help="The agent's health endpoint [default: $VAULTTMPFS_HEALTH_ADDR, else 127.0.0.1:9829].")
@click.option("--kubelet-pid", type=int, help="Take the driver's environment from this process "
              "[default: the process named kubelet, else this command's environment].")
def doctor(as_json: bool, health_addr: str, kubelet_pid: int | None) -> None:
    """Check this node, read-only: one line per check, each FAIL with its fix; exit 1 on any FAIL."""
    from .ops import doctor as node_doctor

    checks = node_doctor.run(health_addr=health_addr or None, kubelet_pid=kubelet_pid)
    result = node_doctor.report(checks)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for check in checks:
            click.echo(check.line())
    if not result["ok"]:
        raise SystemExit(1)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@pass_config
def status(obj: Settings, as_json: bool) -> None:
    """The volumes this node holds and the revocations it still owes (from the state dir, no Vault call)."""
    from .ops import status as node_status

    report = node_status.collect(obj.config)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in node_status.render(report):
            click.echo(line)


@cli.command()
@click.option("--pod-uid", help="Rotate this pod's volumes.")
@click.option("--namespace", help="Rotate the volumes of the pods of this namespace.")
@click.option("--all", "everything", is_flag=True, help="Rotate every volume on this node.")
@setting_option("--grace", type=_Duration(), env="VAULTTMPFS_ROTATE_GRACE", default="10m",
                help="Revoke an old token this long after the rotation at the latest; sooner once the pod side "
                     "took the new one (VAULTTMPFS_ROTATE_GRACE) [default: 10m].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@pass_config
def rotate(obj: Settings, pod_uid: str | None, namespace: str | None, everything: bool, grace: float,
           as_json: bool) -> None:
    """Give volumes on this node a freshly minted wrapped token now (the pod's `vaulttmpfs token --renew`
    switches to it); the old token is revoked by the agent once the pod took the new one, or after --grace."""
    from .engine import rotate as rotation
    from .engine.operation import Engine

    if not (pod_uid or namespace or everything):
        raise click.UsageError("name the volumes: --pod-uid UID, --namespace NAME, or --all")
    engine = Engine(obj.config)
    results = rotation.rotate(engine, rotation.chosen(engine.store.list_volumes(), pod_uid, namespace), grace)
    if as_json:
        click.echo(json.dumps({"volumes": results}, indent=2))
    else:
        click.echo(f"{sum(r['outcome'] == 'rotated' for r in results)} of {len(results)} volume(s) rotated")
        for r in results:
            detail = r.get("why") or r.get("error") or f"new token {r['accessor']}, old {r['old_accessor']} " \
                f"revoked once the pod took the new one (at most {int(grace)}s)"
            click.echo(f"  {r['outcome']:<8} {r['namespace'] or '-'}/{r['pod'] or r['pod_uid']}: {detail}")
    if any(r["outcome"] == "failed" for r in results):
        raise SystemExit(1)


@cli.command()
@setting_option("--plugin-dir", env="VAULTTMPFS_PLUGIN_DIR", default=Config.plugin_dir,
                help="The kubelet's --volume-plugin-dir (VAULTTMPFS_PLUGIN_DIR).")
@click.option("--keep-token", is_flag=True, help="Leave the node's generator token alive (e.g. to reinstall).")
@click.option("--wait", is_flag=True,
              help="Try again every --wait-interval until it succeeds, then idle until SIGTERM (the uninstall "
                   "variant's container); meanwhile renew the generator token, serve the CSI teardown on "
                   "--csi-endpoint and /healthz on --health-addr (200 once uninstalled).")
@click.option("--wait-interval", type=_Duration(), default="10s", show_default=True,
              help="With --wait: how often to try again.")
@setting_option("--csi-endpoint", env="VAULTTMPFS_CSI_ENDPOINT", default="", metavar="unix:///PATH",
                help="With --wait: serve the CSI node plugin here, teardown only (NodeUnpublishVolume; no new "
                     "volume), so that the pods holding the uninstall up can go (VAULTTMPFS_CSI_ENDPOINT).")
@setting_option("--health-addr", env="VAULTTMPFS_HEALTH_ADDR", default="",
                help="With --wait: host:port for GET /healthz (200 once uninstalled, else 503 with the reason) and "
                     "/livez (VAULTTMPFS_HEALTH_ADDR) [default: none].")
@pass_config
def uninstall(obj: Settings, plugin_dir: str, keep_token: bool, wait: bool, wait_interval: float, csi_endpoint: str,
              health_addr: str) -> None:
    """Remove the driver from this node: refused while a volume is mounted; revokes the generator token."""
    from .ops import uninstall as remover

    if wait:
        _uninstall_when_possible(obj.config, plugin_dir, not keep_token, wait_interval, csi_endpoint, health_addr)
        return
    result = remover.uninstall(obj.config, plugin_dir, revoke=not keep_token)
    for line in remover.summary(result):  # nothing imported from here on: the bundle may be gone
        click.echo(line)


def _uninstall_when_possible(config: Config, plugin_dir: str, revoke: bool, interval: float, csi_endpoint: str,
                             health_addr: str) -> None:
    import signal
    import threading

    from .ops.uninstall_wait import UninstallWait

    waiter = UninstallWait(config, plugin_dir, revoke, interval, csi_endpoint or None, health_addr or None)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    waiter.run(stopping, lambda line, refused: click.echo(line, err=refused))


def main(argv: list[str]) -> int:
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
