"""The training loop and what it leans on: optimizer and schedule, checkpoints, tracking."""
