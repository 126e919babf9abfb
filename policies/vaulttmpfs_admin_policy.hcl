# vaulttmpfs-admin: what `vaulttmpfs bootstrap` needs on a node, for the people (an LDAP group) or
# the short-lived token that bootstrap nodes. Write it once as a Vault operator:
#   bao policy write vaulttmpfs-admin vaulttmpfs_admin_policy.hcl
#   bao write auth/ldap/groups/<your group> policies=vaulttmpfs-admin
# Names below are the defaults: adjust them if you use --policy or VAULTTMPFS_ROLE_NAME.
#
# It can mint generator tokens and nothing else: it cannot change the generator policy or either
# token role (that is `vaulttmpfs_setup_policy.hcl`, for Vault operators, once per cluster), so it
# cannot widen what a generator token, or a pod token, may get.

# Mint a node's generator token. Only through this role: it fixes the policy (token_generator),
# makes the token an orphan and periodic, and needs no sudo (create-orphan with a policy the
# caller lacks, or a periodic token, would).
path "auth/token/create/vaulttmpfs-generator" {
  capabilities = ["update"]
}

# Check the login token (bootstrap refuses root) and drop the LDAP login token when done.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/revoke-self" {
  capabilities = ["update"]
}
