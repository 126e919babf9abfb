"""The pod's side: `vaulttmpfs token`, run in the pod (init container and/or sidecar), not by the kubelet.

source: what the volume holds; output: the files consumers read; token: unwrap once, restart-safe;
renewer: keep the token alive until SIGTERM.
"""
