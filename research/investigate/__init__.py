"""Study `investigate` (see README.md beside this file)."""
