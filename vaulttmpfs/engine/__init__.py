"""The volume operation, written once for every front end: admission, token, state, tmpfs, files, undo,
revocation. Knows nothing of how the kubelet called (argv or gRPC)."""
