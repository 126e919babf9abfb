"""A real OpenLDAP `slapd` on a free loopback port, with its own config and database in a temp dir.

Nothing of the system's slapd is used (Debian's package may run one on :389 from /etc/ldap):
our own slapd.conf, our own mdb directory, pid file and port. The directory is loaded offline
with `slapadd` before the server starts, so the fixture needs no admin write over the wire.
Stdlib only, like vaultserver.py.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .vaultserver import dies_with_parent, free_port, stop_process

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/libexec")
MODULE_DIRS = ("/usr/lib/ldap", "/usr/lib/x86_64-linux-gnu/openldap", "/usr/lib64/openldap", "/usr/lib/openldap",
               "/usr/libexec/openldap")
SCHEMA_DIRS = ("/etc/ldap/schema", "/etc/openldap/schema", "/usr/share/openldap/schema")


def find_program(name: str) -> str:
    # slapd lives in sbin, which a non-login root shell may not have on PATH.
    found = shutil.which(name) or next(
        (os.path.join(d, name) for d in SBIN_DIRS if os.access(os.path.join(d, name), os.X_OK)), None)
    if not found:
        raise RuntimeError(f"no `{name}` binary: apt-get install slapd ldap-utils (see .ci/run)")
    return found


def ssha(password: str) -> str:
    """RFC 2307 {SSHA} hash, what slappasswd writes by default."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


@dataclass
class User:
    uid: str
    password: str
    groups: list[str] = field(default_factory=list)


class LdapServer:
    """slapd serving `dc=vaulttmpfs,dc=test`: ou=people (users), ou=groups (groupOfNames), and a
    read-only service account Vault binds as to find users and their groups."""

    base = "dc=vaulttmpfs,dc=test"

    def __init__(self, users: list[User]):
        self.users = users
        self.port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.workdir = tempfile.mkdtemp(prefix="vaulttmpfs-slapd-")
        self.admin_dn = f"cn=admin,{self.base}"
        self.admin_password = secrets.token_urlsafe(12)
        self.reader_dn = f"cn=vault-reader,ou=services,{self.base}"
        self.reader_password = secrets.token_urlsafe(12)
        self.proc: subprocess.Popen | None = None

    def user_dn(self, uid: str) -> str:
        return f"uid={uid},ou=people,{self.base}"

    # --- files ---
    def _config(self) -> str:
        schema_dir = next((d for d in SCHEMA_DIRS if os.path.exists(os.path.join(d, "core.schema"))), None)
        if schema_dir is None:
            raise RuntimeError("no OpenLDAP schema files (core.schema): apt-get install slapd")
        module_dir = next((d for d in MODULE_DIRS if os.path.exists(os.path.join(d, "back_mdb.so"))), None)
        # Debian builds back_mdb as a module; other builds link it in.
        modules = f"modulepath {module_dir}\nmoduleload back_mdb\n" if module_dir else ""
        schemas = "".join(f"include {schema_dir}/{name}.schema\n"
                          for name in ("core", "cosine", "inetorgperson", "nis"))
        return (
            f"{schemas}"
            f"pidfile {self.workdir}/slapd.pid\n"
            f"argsfile {self.workdir}/slapd.args\n"
            f"{modules}"
            "database mdb\n"
            "maxsize 16777216\n"
            f'suffix "{self.base}"\n'
            f'rootdn "{self.admin_dn}"\n'
            f"rootpw {ssha(self.admin_password)}\n"
            f"directory {self.workdir}/db\n"
            # Passwords are only ever compared (bind), never read; Vault's reader and bound users read the rest.
            "access to attrs=userPassword by anonymous auth by * none\n"
            f'access to * by dn.exact="{self.reader_dn}" read by users read by * none\n'
        )

    def _ldif(self) -> str:
        entries = [
            [f"dn: {self.base}", "objectClass: dcObject", "objectClass: organization", "dc: vaulttmpfs",
             "o: vaulttmpfs tests"],
            *[[f"dn: ou={ou},{self.base}", "objectClass: organizationalUnit", f"ou: {ou}"]
              for ou in ("people", "groups", "services")],
            [f"dn: {self.reader_dn}", "objectClass: organizationalRole", "objectClass: simpleSecurityObject",
             "cn: vault-reader", f"userPassword: {ssha(self.reader_password)}"],
        ]
        for user in self.users:
            entries.append([f"dn: {self.user_dn(user.uid)}", "objectClass: inetOrgPerson", f"uid: {user.uid}",
                            f"cn: {user.uid}", f"sn: {user.uid}", f"userPassword: {ssha(user.password)}"])
        for group in sorted({g for user in self.users for g in user.groups}):
            members = [f"member: {self.user_dn(u.uid)}" for u in self.users if group in u.groups]
            entries.append([f"dn: cn={group},ou=groups,{self.base}", "objectClass: groupOfNames", f"cn: {group}",
                            *members])
        return "\n\n".join("\n".join(entry) for entry in entries) + "\n"

    # --- process ---
    def start(self, timeout: float = 20.0) -> "LdapServer":
        conf = Path(self.workdir, "slapd.conf")
        conf.write_text(self._config())
        os.mkdir(Path(self.workdir, "db"), 0o700)
        Path(self.workdir, "data.ldif").write_text(self._ldif())
        subprocess.run([find_program("slapadd"), "-q", "-f", str(conf), "-l", str(Path(self.workdir, "data.ldif"))],
                       check=True, capture_output=True, timeout=60)
        # -d keeps slapd in the foreground (no fork) so Popen owns the real server process.
        with open(Path(self.workdir, "slapd.log"), "wb") as log:  # slapd keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [find_program("slapd"), "-f", str(conf), "-h", f"{self.url}/", "-d", "0"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=dies_with_parent())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited early: {Path(self.workdir, 'slapd.log').read_text()[-2000:]}")
            if self.search(self.reader_dn, self.reader_password, f"uid={self.users[0].uid}").returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("slapd did not become ready")

    def search(self, bind_dn: str, password: str, query: str) -> subprocess.CompletedProcess:
        """ldapsearch as `bind_dn` (for readiness, and for tests that check the directory itself)."""
        return subprocess.run(
            [find_program("ldapsearch"), "-x", "-LLL", "-H", self.url, "-D", bind_dn, "-w", password,
             "-b", self.base, query],
            capture_output=True, text=True, timeout=10, env={**os.environ, "LDAPNOINIT": "1"})

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LdapServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def vault_config(self) -> dict:
        """auth/ldap/config for Vault/OpenBao: find the user as the reader, bind as the user,
        groups are the groupOfNames the user is a member of."""
        return {
            "url": self.url,
            "binddn": self.reader_dn,
            "bindpass": self.reader_password,
            "userdn": f"ou=people,{self.base}",
            "userattr": "uid",
            "groupdn": f"ou=groups,{self.base}",
            "groupattr": "cn",
            "groupfilter": "(&(objectClass=groupOfNames)(member={{.UserDN}}))",
            "request_timeout": "5s",
        }

