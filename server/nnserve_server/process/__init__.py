"""The server as a process: the command line (`cli`), the glibc allocator's settings (`allocator`), the
event loop (`event_loop`), and `--workers` (`workers` supervises the worker processes; `worker_metrics`
adds up their metrics)."""
