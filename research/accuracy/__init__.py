"""Study `accuracy` (see README.md beside this file)."""
