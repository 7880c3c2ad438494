"""Fan-out of what the pool commits: the live stream, the time series and the metrics."""
