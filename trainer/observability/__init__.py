"""What a run reports: telemetry, metric records and loggers, timing, profiling, trackers, TensorBoard
and metric objects."""
