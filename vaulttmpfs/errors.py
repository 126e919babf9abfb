"""The one exception every layer raises for a failure an operator can act on."""


class DriverError(Exception):
    """A failure whose message is shown to the cluster operator as-is."""


class VaultUnavailable(DriverError):
    """Vault could not be reached or kept failing (network, TLS, 5xx, sealed)."""

    unsent = False  # True: certainly failed before Vault saw the request (so a create minted nothing)


class VaultRateLimited(VaultUnavailable):
    """Vault's rate-limit quota (429) turned the request away before acting on it, for longer than the
    call could wait: safe to send again later."""

    unsent = True


class VaultBusy(VaultUnavailable):
    """This node already had its budget of Vault writes in flight for longer than the call could wait."""

    unsent = True


class VaultDenied(DriverError):
    """Vault answered and refused (4xx): retrying the same request will not help."""


class BadRequest(DriverError):
    """The caller's request is malformed (an attribute, a path): the message names what to fix."""


class Forbidden(DriverError):
    """Well-formed, but this pod may not have it (policy bindings, a spoofed identity)."""


class Conflict(DriverError):
    """The volume is already there, made for a different request (readOnly, fsGroup): not remade."""


class StateError(DriverError, OSError):
    """The state dir failed a read or a write: what needed it was not done. An OSError too, so every
    handler of a failed state access still catches it; a DriverError, so commands say it plainly."""

    def __init__(self, message: str, cause: OSError):
        super().__init__(message)
        self.errno, self.strerror = cause.errno, cause.strerror

    def __str__(self) -> str:
        return str(self.args[0])


class StateUnwritable(StateError):
    """The state dir could not take a write (its filesystem full or read-only, an I/O error)."""


class StateUnreadable(StateError):
    """The state dir could not be listed (not root, an I/O error)."""


class StateFull(StateUnwritable):
    """The state dir's filesystem is out of space (or quota)."""


class TokenNotWrapped(VaultUnavailable):
    """Vault answered with a plain token (something stripped X-Vault-Wrap-TTL): not for the pod.

    Here, not in vault.client (which re-exports it): the engine catches it on the brokered exec path,
    which never loads the Vault client."""

    def __init__(self, message: str, accessor: str | None):
        super().__init__(message)
        self.accessor = accessor
