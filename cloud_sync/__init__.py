"""cloud_sync: receives the fleet's batches over MQTT, stores each record once, acknowledges after commit."""

__version__ = "0.1.0"
