"""A path as a checkpoint: one open, one sniff, one dispatch; what a load would report."""
