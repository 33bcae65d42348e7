"""Scoring, reports and pictures of a finished run."""
