"""Aggregation: what is computed once over all committed rows (histograms, the age-error correction, the report)."""
