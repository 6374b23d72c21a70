"""llmkd.methods."""
