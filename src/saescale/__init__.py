"""saescale."""
