"""Simple, obviously-correct reference implementations that the tests compare against.

One module per room (placement.py, ops.py, ...); tests import from here, never re-implement.
"""
