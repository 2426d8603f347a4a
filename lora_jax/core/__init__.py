"""Framework-free building blocks: pure functions on arrays (no flax)."""
