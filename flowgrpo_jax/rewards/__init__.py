"""Rewards run in a separate host process: server.py, client.py; see docs/rewards.md."""
