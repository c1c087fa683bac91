"""One module per model family, each a `Family` (family.py): build, train, export, and its constants."""
