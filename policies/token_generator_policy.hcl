# The node's generator token: exactly what vaulttmpfs needs, nothing more.
# The role name must match VAULTTMPFS_ROLE_NAME (default "applications"); add one
# "create" path per extra role that volumes may name with `vault/role`.

# Mint pod tokens through the role (the role, not this policy, decides what they can get).
path "auth/token/create/applications" {
  capabilities = ["create", "update"]
}

# Let `vaulttmpfs doctor` check the role exists and allows what the policy bindings allow.
path "auth/token/roles/applications" {
  capabilities = ["read"]
}

# Revoke a pod token (and its wrapping token) by accessor when the pod goes away.
path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}

# The node's token inventory (`vaulttmpfs status`, /metrics): is each pod token it minted still
# alive, and when does it expire. Returns a token's properties, never the token.
path "auth/token/lookup-accessor" {
  capabilities = ["update"]
}

# Keep the (periodic) generator token alive, and let the node check it.
path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}
