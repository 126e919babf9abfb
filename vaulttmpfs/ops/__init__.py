"""Operator commands' logic: bootstrap a node's generator token, install the driver."""
