"""Study `head_cost` (see README.md beside this file)."""
