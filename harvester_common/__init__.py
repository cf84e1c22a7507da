"""What the vehicle and the cloud both speak: the wire format, sequence ranges, config files, how a command ends.

Imported by `agent` and `cloud_sync`; imports neither (import contracts in pyproject.toml).
"""
