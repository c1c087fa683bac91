"""One module per model family, each with the same few names: build, train, export, and constants
NAME, FAMILY, TASK, QUALITY_BAR."""
