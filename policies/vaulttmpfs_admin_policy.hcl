# vaulttmpfs-admin: what `vaulttmpfs bootstrap` needs, for the people (an LDAP group) or the
# short-lived token that bootstrap nodes. Write it once as root:
#   bao policy write vaulttmpfs-admin vaulttmpfs_admin_policy.hcl
#   bao write auth/ldap/groups/<your group> policies=vaulttmpfs-admin
# Names below are the defaults: adjust them if you use --policy or VAULTTMPFS_ROLE_NAME.

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

# `bootstrap --setup-vault`: the generator policy and the two token roles.
# Whoever may rewrite these may grant generator tokens more rights: keep this group small,
# or drop this section once the cluster is set up.
path "sys/policies/acl/token_generator" {
  capabilities = ["create", "read", "update"]
}

path "auth/token/roles/applications" {
  capabilities = ["create", "read", "update"]
}

path "auth/token/roles/vaulttmpfs-generator" {
  capabilities = ["create", "read", "update"]
}
