#!/bin/sh
# Example: the token role that vaulttmpfs mints pod tokens through (VAULTTMPFS_ROLE_NAME).
# orphan: a pod token outlives a re-bootstrapped generator token; it is revoked at unmount.
# token_period: the pod renews its own token; if the node dies and unmount never runs,
#   an unrenewed token still expires after one period (1h).
# allowed_policies: the only policies a volume's `vault/policies` may ask for.
set -eu
bao write auth/token/roles/applications \
    allowed_policies="nginx" \
    disallowed_policies="root,token_generator" \
    orphan=true \
    renewable=true \
    token_period=1h \
    token_type=service
bao policy write token_generator "$(dirname "$0")/token_generator_policy.hcl"
