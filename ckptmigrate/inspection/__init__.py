"""Looking at checkpoints: differences, fixture checks, scans, drafts of migrations."""
