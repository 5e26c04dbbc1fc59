"""What versions exist and how to go between them, knowing nothing about files."""
