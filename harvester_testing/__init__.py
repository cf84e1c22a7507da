"""Real parts for tests, the demo and benchmarks: Mosquitto, PostgreSQL, TLS, agent and receiver processes."""
