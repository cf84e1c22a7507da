"""Harvester edge agent: sources → decode → features → scoring → store → uplink."""

import os

__version__ = "0.1.0"

# onnxruntime 1.29+ on Linux sends usage telemetry to Microsoft (mobile.events.data.microsoft.com) and keeps a device
# id and an event cache under ~/.cache/Microsoft/DeveloperTools/.onnxruntime, unless this is set before it starts.
# A vehicle sends nothing but its own data, to its own broker. Set here, before any agent module imports it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
