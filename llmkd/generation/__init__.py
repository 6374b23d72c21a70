"""llmkd.generation."""
