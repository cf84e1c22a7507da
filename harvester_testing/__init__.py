"""Real parts for tests, the demo and benchmarks: Mosquitto, PostgreSQL, TLS, agent and receiver processes, and
models, keys and signed packages for model updates (modelkit)."""
