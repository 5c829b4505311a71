"""Muon + AdamW with per-block Newton-Schulz orthogonalization."""
