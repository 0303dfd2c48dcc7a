import os
import sys

# tests import small helpers (refmodels.py, ...) from this folder
sys.path.insert(0, os.path.dirname(__file__))
