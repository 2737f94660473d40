"""Entry points kept for the original tool's users (`python -m esper.scripts.train ...`)."""
