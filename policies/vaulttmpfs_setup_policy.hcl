# vaulttmpfs-setup: what `vaulttmpfs bootstrap --setup-vault` writes, once per cluster.
#
# Whoever holds this may rewrite the generator policy or the token roles, and so grant generator
# tokens (and through them, pods) any policy: it is as strong as a Vault admin. Give it to no group
# that bootstraps nodes; use it through a short-lived token of your own, together with
# vaulttmpfs-admin (bootstrap mints the first node's token in the same run):
#   bao policy write vaulttmpfs-setup vaulttmpfs_setup_policy.hcl
#   VAULT_TOKEN=$(bao token create -policy=vaulttmpfs-setup -policy=vaulttmpfs-admin -ttl=10m -field=token) \
#     vaulttmpfs bootstrap --setup-vault
# Names below are the defaults: adjust them if you use --policy or VAULTTMPFS_ROLE_NAME.

path "sys/policies/acl/token_generator" {
  capabilities = ["create", "read", "update"]
}

path "auth/token/roles/applications" {
  capabilities = ["create", "read", "update"]
}

path "auth/token/roles/vaulttmpfs-generator" {
  capabilities = ["create", "read", "update"]
}
