"""torch.save files: read without torch, loaded with torch's weights-only loader, rewritten."""
