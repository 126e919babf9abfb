"""One log line per call, with duration and outcome, and the error-to-status mapping, in one place
(as the Vault CSI provider's interceptor does). Only chosen fields are logged: never the volume
context's service-account tokens, never `secrets`."""

from __future__ import annotations

import time

import grpc

from .. import log, telemetry
from . import status

# Volume context keys worth a log field (who asked); everything else stays out of the log.
_POD_KEYS = {"csi.storage.k8s.io/pod.namespace": "namespace", "csi.storage.k8s.io/pod.name": "pod",
             "csi.storage.k8s.io/pod.uid": "pod_uid"}


def call_fields(request) -> dict:
    fields = {}
    for name in ("volume_id", "target_path"):
        value = getattr(request, name, "")
        if value:
            fields[name] = value
    context = getattr(request, "volume_context", None)
    if context:
        fields.update({field: context[key] for key, field in _POD_KEYS.items() if key in context})
    return fields


class LogAndMap(grpc.ServerInterceptor):
    def __init__(self, state_dir: str):
        self.state_dir = state_dir  # where a call is spooled for /metrics when the agent serves none

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        verb = _COUNTED.get(method)

        def serve(request, context):
            started = time.monotonic()
            logger = log.get(component="csi", rpc=method, **call_fields(request))
            if verb:
                telemetry.begin()
            try:
                response = inner(request, context)
            except Exception as exc:  # every failure becomes a status, never a stack
                if verb:
                    telemetry.failed(exc)
                    telemetry.finish(verb, False, time.monotonic() - started, self.state_dir, via="agent",
                                     front_end="csi")
                code, message = status.of(exc)
                elapsed = round((time.monotonic() - started) * 1000, 1)
                if status.is_bug(exc):
                    logger.error("csi call failed", code=code.name, error=message, ms=elapsed, exc_info=exc)
                else:
                    logger.warning("csi call failed", code=code.name, error=message, ms=elapsed)
                context.abort(code, message)
            if verb:
                telemetry.finish(verb, True, time.monotonic() - started, self.state_dir, via="agent", front_end="csi")
            if method not in _QUIET:
                logger.info("csi call", code="OK", ms=round((time.monotonic() - started) * 1000, 1))
            return response

        return grpc.unary_unary_rpc_method_handler(
            serve, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


# Counted in the agent's /metrics like the FlexVolume verbs (front_end="csi").
_COUNTED = {"NodePublishVolume": "mount", "NodeUnpublishVolume": "unmount"}
# The livenessprobe sidecar calls Probe every few seconds: not worth a line each when it succeeds.
_QUIET = {"Probe"}
