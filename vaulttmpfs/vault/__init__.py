"""The only place hvac is imported: every call to Vault/OpenBao goes through `client.Vault`."""
