"""llmkd.eval."""
