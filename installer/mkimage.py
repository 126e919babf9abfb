#!/usr/bin/env python3
"""Build a container image without a docker daemon or a registry: one uncompressed layer made of
host files (the PyInstaller bundle, the few Debian files it and the image's commands need), written
as an archive that both `docker load` and `ctr images import` read (docker-archive manifest.json next
to an OCI image layout, as `docker save` writes since Docker 25).

Reproducible: entries sorted, mtimes = SOURCE_DATE_EPOCH, owner 0:0 with no names, modes without
group/other write, no compression (so no gzip timestamp), JSON with sorted keys.

The image config (Env, User, Entrypoint, WorkingDir) is read from a Dockerfile of the form
`FROM scratch` + `ADD <rootfs tar> /` + those instructions, so docker/podman users build the same
image from the same rootfs tar and the two cannot drift apart.

    mkimage.py --dockerfile installer/Dockerfile --tag vaulttmpfs-installer:0.1.0 \
        --rootfs build/image/rootfs.tar --out build/image/vaulttmpfs-installer.tar \
        --tree /opt/vaulttmpfs=dist/vaulttmpfs --file /usr/local/bin/x=installer/x --host /bin/sleep
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tarfile
import time

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


class Rootfs:
    """The image's files: path inside the image (no leading /) -> (kind, source or link target)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, str]] = {}

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), ("dir", ""))

    def add(self, path: str, kind: str, source: str) -> None:
        path = path.strip("/")
        self._parents(path)
        old = self.entries.get(path)
        if old is not None and old != (kind, source) and not (kind == "dir" and old[0] == "dir"):
            raise SystemExit(f"mkimage: {path} added twice, differently: {old} and {(kind, source)}")
        self.entries[path] = (kind, source)

    def add_tree(self, dest: str, source: str) -> None:
        self.add(dest, "dir", source)
        for top, dirs, files in os.walk(source):
            rel = os.path.relpath(top, source)
            for name in dirs + files:
                src = os.path.join(top, name)
                path = os.path.normpath(os.path.join(dest, rel, name))
                if os.path.islink(src):
                    self.add(path, "symlink", os.readlink(src))
                elif os.path.isdir(src):
                    self.add(path, "dir", src)
                else:
                    self.add(path, "file", src)

    def add_host(self, path: str) -> None:
        """A host file at the same path, every symlink on the way kept as a symlink (merged /usr:
        /lib -> usr/lib, /lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/...)."""
        done = ""
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            here = f"{done}/{part}"
            if os.path.islink(here):
                target = os.readlink(here)
                self.add(here, "symlink", target)
                rest = "/".join(parts[i + 1:])
                resolved = os.path.normpath(os.path.join(os.path.dirname(here), target))  # an absolute target wins
                return self.add_host(f"{resolved}/{rest}" if rest else resolved)
            done = here
        if not os.path.isfile(done):
            raise SystemExit(f"mkimage: {path} is not a file on this host")
        self.add(done, "file", done)

    def elf_files(self) -> list[str]:
        out = []
        for kind, source in self.entries.values():
            if kind == "file" and os.access(source, os.R_OK):
                with open(source, "rb") as f:
                    if f.read(4) == b"\x7fELF":
                        out.append(source)
        return sorted(set(out))

    def add_libraries(self, bundle_libs: list[str]) -> None:
        """The host's shared libraries every ELF file needs that the image does not already hold
        (ldd). The bundle's libraries find each other in its lib dir; its bootloader, started before
        anything is loaded from there, takes what it needs (libz) from the system."""
        inside = tuple(os.path.realpath(d) + "/" for d in bundle_libs)
        env = {**os.environ, "LD_LIBRARY_PATH": ":".join(bundle_libs)}
        needed = set()
        for elf in self.elf_files():
            own = os.path.realpath(elf).startswith(inside)
            proc = subprocess.run(["ldd", elf], capture_output=True, text=True, env=env if own else None)
            if "not a dynamic executable" in proc.stdout + proc.stderr or "statically linked" in proc.stdout:
                continue
            for line in proc.stdout.splitlines():
                m = re.match(r"\s*(?:\S+ => )?(/\S+) \(0x", line)
                if m and not os.path.realpath(m.group(1)).startswith(inside):
                    needed.add(m.group(1))
                elif "not found" in line:
                    raise SystemExit(f"mkimage: {elf} needs {line.strip()}")
        for lib in sorted(needed):
            self.add_host(lib)

    def tar(self, epoch: int) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                kind, source = self.entries[path]
                info = tarfile.TarInfo(path)
                info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "", ""
                if kind == "symlink":
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, source, 0o777
                    tar.addfile(info)
                elif kind == "dir":
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                else:
                    st = os.stat(source)
                    info.mode = stat.S_IMODE(st.st_mode) & 0o755 | 0o644
                    info.size = st.st_size
                    with open(source, "rb") as f:
                        tar.addfile(info, f)
        return buf.getvalue()


def dockerfile_config(path: str) -> dict:
    """Env, User, WorkingDir, Entrypoint, Cmd from a `FROM scratch` + ADD Dockerfile (nothing else allowed)."""
    text = re.sub(r"\\\n", " ", open(path).read())
    config: dict = {}
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM" and rest.strip() == "scratch" or word == "ADD":
            continue
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
        elif word == "USER":
            config["User"] = rest.strip()
        elif word == "WORKDIR":
            config["WorkingDir"] = rest.strip()
        elif word in ("ENTRYPOINT", "CMD"):
            config[word.title() if word == "CMD" else "Entrypoint"] = json.loads(rest)
        else:
            raise SystemExit(f"mkimage: {path}: {word} is not something this recipe can reproduce")
    if env:
        config["Env"] = [f"{k}={v}" for k, v in env.items()]
    return config


def debian_package(path: str) -> str:
    # dpkg knows merged-/usr files by either name (/lib/... or /usr/lib/...).
    for name in (path, os.path.realpath(path), path.removeprefix("/usr")):
        owner = subprocess.run(["dpkg", "-S", name], capture_output=True, text=True)
        if owner.returncode == 0:
            return owner.stdout.split(":")[0]
    return "?"


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def archive(layer: bytes, config: dict, tag: str, epoch: int) -> tuple[bytes, str]:
    """The image archive and its manifest digest."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    image_config = canonical({
        "architecture": ARCH.get(os.uname().machine, os.uname().machine), "os": "linux", "created": created,
        "config": config, "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": created, "created_by": "installer/mkimage.py"}],
    })
    config_digest = "sha256:" + hashlib.sha256(image_config).hexdigest()
    manifest = canonical({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(image_config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                    "size": len(layer)}],
    })
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    name, _, version = tag.rpartition(":")
    first = name.split("/")[0]
    if "/" in name and ("." in first or ":" in first or first == "localhost"):
        full = name  # already names its registry
    else:
        full = f"docker.io/{name}" if "/" in name else f"docker.io/library/{name}"
    index = canonical({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                       "size": len(manifest), "annotations": {
                           "io.containerd.image.name": f"{full}:{version}",
                           "org.opencontainers.image.ref.name": version}}],
    })
    blob = lambda d: "blobs/sha256/" + d.split(":")[1]  # noqa: E731
    docker_manifest = canonical([{"Config": blob(config_digest), "RepoTags": [tag], "Layers": [blob(layer_digest)]}])
    files = {"oci-layout": canonical({"imageLayoutVersion": "1.0.0"}), "index.json": index,
             "manifest.json": docker_manifest, blob(config_digest): image_config, blob(manifest_digest): manifest,
             blob(layer_digest): layer}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch
            tar.addfile(info)
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(files[path]), 0o644, epoch
            tar.addfile(info, io.BytesIO(files[path]))
    return buf.getvalue(), manifest_digest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dockerfile", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--out", required=True, help="the image archive")
    p.add_argument("--rootfs", help="also write the layer here (the Dockerfile's ADD source)")
    p.add_argument("--contents", help="also write the list of files, with the Debian package of each host file")
    p.add_argument("--tree", action="append", default=[], metavar="DEST=SRC", help="a directory, recursively")
    p.add_argument("--file", action="append", default=[], metavar="DEST=SRC")
    p.add_argument("--host", action="append", default=[], metavar="PATH", help="a host file at the same path")
    p.add_argument("--libs-from", action="append", default=[], metavar="DIR",
                   help="libraries found here are the image's own (the bundle's lib dir)")
    args = p.parse_args(argv)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    fs = Rootfs()
    for spec in args.tree:
        dest, _, src = spec.partition("=")
        fs.add_tree(dest, src)
    for spec in args.file:
        dest, _, src = spec.partition("=")
        fs.add(dest, "file", src)
    for path in args.host:
        fs.add_host(path)
    fs.add_libraries(args.libs_from)
    layer = fs.tar(epoch)
    data, digest = archive(layer, dockerfile_config(args.dockerfile), args.tag, epoch)
    for path, content in ((args.rootfs, layer), (args.out, data)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path + ".tmp", "wb") as f:
                f.write(content)
            os.replace(path + ".tmp", path)
    if args.contents:
        with open(args.contents, "w") as f:
            for path in sorted(fs.entries):
                kind, source = fs.entries[path]
                if kind == "file" and source == "/" + path:
                    package = debian_package(source)
                    f.write(f"/{path}\t{os.path.getsize(source)}\t{package}\n")
    print(f"{args.out}: {args.tag} {digest} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
