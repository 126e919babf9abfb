#!/bin/sh
# Sample Vault/OpenBao setup for installer/examples/pod.yaml. Run once, as an admin:
#   VAULT_ADDR=https://vault.example.com:8200 VAULT_TOKEN=<admin token> installer/examples/vault-setup.sh
# Works with `vault` or `bao` (OpenBao); set VAULT_CLI to choose.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
policies="$here/../../policies"
cli="${VAULT_CLI:-$(command -v vault || command -v bao)}"

# 1. What a pod may get: the policies its volume names (`vault/policies: nginx`).
"$cli" policy write nginx "$here/nginx-policy.hcl"

# 2. The token role pod tokens are created through (VAULTTMPFS_ROLE_NAME, default "applications"):
#    orphan, periodic 1h, and only the policies listed in allowed_policies.
"$cli" write auth/token/roles/applications @"$policies/applications_role.json"

# 3. The policy of each node's generator token: create through that role, revoke, renew itself.
"$cli" policy write token_generator "$policies/token_generator_policy.hcl"

cat <<'NEXT'
Done. Next, on each node, give it a generator token (periodic, so the node agent can renew it):
  vaulttmpfs bootstrap
or by hand:
  install -d -m 700 /etc/vaulttmpfs && vault token create -policy=token_generator -no-default-policy \
    -orphan -period=24h -field=token > /etc/vaulttmpfs/vaulttoken && chmod 600 /etc/vaulttmpfs/vaulttoken
NEXT
