"""Imported by fast_checks.py as a sibling module: works only if sys.path[0] is this directory."""

VALUE = "sibling imported"
