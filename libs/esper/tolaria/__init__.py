"""Tolaria: data, training and evaluation loops, and the safety governor."""
