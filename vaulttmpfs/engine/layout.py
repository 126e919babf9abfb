"""Where the kubelet puts a pod's volume, per front end. The path is the one piece of identity a pod
cannot choose: the kubelet makes it from the pod's uid, so admission reads the uid from it.

  FlexVolume  <pods dir>/<pod uid>/volumes/cloudwatt~vaulttmpfs/<volume name>
  CSI         <pods dir>/<pod uid>/volumes/kubernetes.io~csi/<volume name>/mount
"""

from __future__ import annotations

from ..errors import BadRequest
from ..value import Value
from . import volume


class Layout(Value):
    plugin_dir: str  # the component after volumes/
    leaf: str | None = None  # a fixed last component (CSI's target path ends in /mount)

    def describe(self) -> str:
        return f"<pods dir>/<pod uid>/volumes/{self.plugin_dir}/<name>" + (f"/{self.leaf}" if self.leaf else "")

    def parts(self, path: str, pods_dir: str, real_path: str | None = None) -> tuple[str, str]:
        """(pod uid, volume name) from a volume path (resolved already: `real_path`), or BadRequest
        saying what the path must be."""
        parts = volume.parts_below(path, pods_dir, real_path)
        tail = [self.leaf] if self.leaf else []
        if not parts or len(parts) != 4 + len(tail) or parts[1:3] != ["volumes", self.plugin_dir] or \
                parts[4:] != tail:
            raise BadRequest(
                f"mount dir {path} is not a pod volume dir {self.describe()} below VAULTTMPFS_PODS_DIR={pods_dir} "
                "(symlinks below it are refused); set VAULTTMPFS_PODS_DIR when the kubelet runs with another "
                "--root-dir"
            )
        return parts[0], parts[3]


FLEXVOLUME = Layout("cloudwatt~vaulttmpfs")
CSI = Layout("kubernetes.io~csi", "mount")
