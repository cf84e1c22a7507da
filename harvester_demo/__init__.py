"""The demo: the whole system on one machine (Mosquitto, cloud_sync, the simulator, the agent) for a minute."""
