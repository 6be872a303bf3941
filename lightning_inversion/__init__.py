"""lightning-inversion."""
