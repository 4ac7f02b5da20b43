"""SQL and cache fixtures (placeholder until written)."""
