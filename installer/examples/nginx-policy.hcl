# What the example pod's token may do: read the nginx app's secrets, nothing else.
path "secret/data/nginx/*" {
  capabilities = ["read"]
}
