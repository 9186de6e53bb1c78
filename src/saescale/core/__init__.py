"""The SAE itself: configuration, the TopK model, and the plain dense reference the fast paths are tested against."""
