"""Harvester edge agent: sources → decode → features → scoring → store → uplink."""

__version__ = "0.1.0"
