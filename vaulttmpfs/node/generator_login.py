"""The agent gets its node's generator token itself: Vault's jwt (or kubernetes) auth with the
DaemonSet's service-account token, no SSH and no person in the loop.

Each round renews the token in VAULTTMPFS_GENERATOR_TOKEN_PATH, as `GeneratorRenewal` does. When
there is none yet, or Vault refuses it (revoked, expired), or renewals stop restoring its lease
(a max TTL), the agent logs in again with the JWT in VAULTTMPFS_AUTH_JWT_PATH as role
VAULTTMPFS_AUTH_ROLE at auth/VAULTTMPFS_AUTH_MOUNT, and writes the new token the way `bootstrap`
does (0600, atomic, durable). A root token is refused; neither the JWT nor a token is logged.
"""

from __future__ import annotations

import os

from .. import log, trust
from ..config import Config
from ..engine import generator
from ..errors import DriverError, VaultDenied
from ..vault.client import Vault
from .generator_renewal import GeneratorRenewal

MAX_JWT_BYTES = 16 * 1024


class GeneratorLogin(GeneratorRenewal):
    name = "generator"  # the same service as far as health and /metrics are concerned

    def __init__(self, config: Config, interval: float | None = None):
        super().__init__(config, interval)
        self.state.update(method=f"{config.auth_mount} login as role {config.auth_role}", logins=0)
        self._login_lease = 0.0

    def run_once(self) -> float:
        logger = log.get(service=self.name)
        try:
            token = generator.read_token(self.config.generator_token_path)
        except DriverError as exc:
            return self._login(logger, f"no usable generator token ({exc})")
        log.secret(token)
        vault = Vault(self.config, token)
        try:
            auth = vault.renew_self()
        except VaultDenied as exc:
            return self._login(logger, f"Vault refused the generator token ({exc})")
        except DriverError as exc:
            return self._failed(logger, str(exc))
        if not self._login_lease:  # a token this agent did not log in for (it restarted since)
            self._login_lease = _lease_at_login(vault)
        lease = float(auth.get("lease_duration") or 0)
        if self._login_lease and 0 < lease < self._login_lease / 2:
            # Its max TTL is near: renewals no longer restore it. A fresh login, then the old one goes.
            delay = self._login(logger, f"renewal gave only {lease:.0f}s (max TTL near)")
            if self.state["last_error"] is None:
                self._revoke_quietly(token, auth.get("accessor"), logger)
            return delay
        return self._renewed(logger, auth)

    def _login(self, logger, why: str) -> float:
        config = self.config
        try:
            jwt = _read_jwt(config.auth_jwt_path)
            log.secret(jwt)
            auth = Vault(config, None).jwt_login(config.auth_role, jwt, config.auth_mount)
        except DriverError as exc:
            return self._failed(logger, f"{why}; logging in failed: {exc}")
        token = auth.get("client_token") or ""
        log.secret(token)
        if "root" in (auth.get("policies") or []):
            return self._failed(logger, f"role {config.auth_role} at auth/{config.auth_mount} hands out root "
                                        "tokens: refused; give it token_policies=token_generator only")
        try:
            _write(config.generator_token_path, token)
        except (OSError, DriverError) as exc:
            self._revoke_quietly(token, auth.get("accessor"), logger)
            return self._failed(logger, f"cannot write the generator token to {config.generator_token_path}: "
                                        f"{getattr(exc, 'strerror', None) or exc}")
        self._login_lease = float(auth.get("lease_duration") or 0)
        self.state.update(logins=self.state["logins"] + 1)
        logger.info("logged in for a generator token", why=why, role=config.auth_role, mount=config.auth_mount,
                    policies=auth.get("policies"))
        return self._renewed(logger, auth, event="generator token written", renewal=False)

    def _revoke_quietly(self, token: str, accessor: str | None, logger) -> None:
        if not accessor:
            return
        try:
            Vault(self.config, token).revoke_accessor(accessor)
        except DriverError as exc:
            logger.warning("could not revoke a generator token", accessor=log.accessor_hint(accessor),
                           error=str(exc))


def _lease_at_login(vault: Vault) -> float:
    """The lease the token was given when made (lookup-self's creation_ttl): what the max-TTL check
    compares renewals with. 0 when Vault does not say (the next round asks again)."""
    try:
        info = vault.lookup_self()
    except DriverError:
        return 0.0
    return float(info.get("creation_ttl") or 0)


def _write(path: str, token: str) -> None:
    """As bootstrap writes it: into a 0700 dir that only root can change (sshd's rule), atomically."""
    trust.check_parent(path, "generator token path")  # and again once made: another user may have made it first
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    trust.check_parent(path, "generator token path")
    generator.write_token(path, token)


def _read_jwt(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_JWT_BYTES + 1)
    except OSError as exc:
        raise DriverError(f"cannot read the service-account token {path} (VAULTTMPFS_AUTH_JWT_PATH): "
                          f"{exc.strerror}; mount a projected service-account token there") from None
    jwt = data.decode("ascii", errors="replace").strip()
    if not jwt or len(data) > MAX_JWT_BYTES or jwt.count(".") != 2:
        raise DriverError(f"{path} (VAULTTMPFS_AUTH_JWT_PATH) does not hold a JWT")
    return jwt
