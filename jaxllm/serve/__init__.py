"""Serving: sampling and cached decoding."""
