"""Real parts for tests, the demo and benchmarks: a Mosquitto broker on a free port, pty pairs, free ports."""
