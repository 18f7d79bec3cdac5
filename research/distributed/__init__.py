"""Study `distributed` (see README.md beside this file)."""
