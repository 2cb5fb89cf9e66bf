"""Small shared utilities: distributed helpers, seeding, checkpoints and logging."""
