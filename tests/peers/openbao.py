"""OpenBao peer fixtures (placeholder until written)."""
