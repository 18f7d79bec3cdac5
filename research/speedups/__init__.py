"""Study `speedups` (see README.md beside this file)."""
