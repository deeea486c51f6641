"""Measurement code, format-agnostic: quality, latency, memory."""
