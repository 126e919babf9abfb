"""The long-lived node agent: generator renewal, revocation retry, health, and the FlexVolume relay server."""
