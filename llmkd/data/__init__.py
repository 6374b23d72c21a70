"""llmkd.data."""
