"""Collect run results (metrics.json files) into pandas and write tables and plots."""
