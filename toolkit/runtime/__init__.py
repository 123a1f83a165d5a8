"""What every stage runs in common (train's validation, eval, export's checks, infer, serve)."""
