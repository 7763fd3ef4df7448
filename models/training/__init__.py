"""Training: a generic step loop (checkpoints, resume, schedule, logging) and recipes over it."""
