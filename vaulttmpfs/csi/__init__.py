"""The CSI front end: the kubelet's gRPC calls for an ephemeral inline volume, adapted to the engine.

Imported only by the node agent when it serves CSI (grpc is never loaded on the FlexVolume path).
The stubs csi_pb2*.py are generated from csi.proto at build time (`make csi-stubs`).
"""

DRIVER_NAME = "vaulttmpfs.cloudwatt.com"
