"""Verification: sha256 manifests, and logit comparison of a reference and a candidate."""
