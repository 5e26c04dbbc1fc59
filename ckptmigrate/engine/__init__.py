"""Running migrations on checkpoints: planning, guarding, following optimizer state, rewriting files."""
