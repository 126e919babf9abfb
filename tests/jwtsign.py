"""JWTs signed the way the Kubernetes API server signs service-account tokens (RS256), with openssl:
no JWT library needed, and the key never leaves the test's temp dir."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Signer:
    def __init__(self, directory: Path):
        self.key = directory / "sa-signing.key"
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                        "-out", str(self.key)], check=True, capture_output=True)
        self.public_pem = subprocess.run(["openssl", "pkey", "-in", str(self.key), "-pubout"], check=True,
                                         capture_output=True, text=True).stdout

    def token(self, subject: str, audience: str = "vault", ttl: int = 600, **claims) -> str:
        now = int(time.time())
        header = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "test"}).encode())
        payload = _b64(json.dumps({"iss": "https://kubernetes.default.svc", "sub": subject, "aud": [audience],
                                   "iat": now, "nbf": now - 5, "exp": now + ttl, **claims}).encode())
        signed = f"{header}.{payload}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signed.encode(),
                                   check=True, capture_output=True).stdout
        return f"{signed}.{_b64(signature)}"
