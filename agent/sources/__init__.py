"""Sources: the input edge. Each runs in its own thread and hands batches to a sink; failures are counted, retried."""
