"""The values a read produces and a write consumes: a checkpoint and its stamp."""
