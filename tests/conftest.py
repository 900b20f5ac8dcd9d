import os
import sys

# tests/reference is imported as `reference`
sys.path.insert(0, os.path.dirname(__file__))
