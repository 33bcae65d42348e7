"""Deployment: merge adapters into their base, serve many adapters on one base, over Python, CLI and HTTP."""
