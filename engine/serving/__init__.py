"""Serving: requests in, tokens and text out, over any `Pipeline`. Imports the contract only."""
