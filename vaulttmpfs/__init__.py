"""vaulttmpfs: a FlexVolume driver that gives every pod its own short-lived, wrapped Vault token."""

__version__ = "0.1.0"
