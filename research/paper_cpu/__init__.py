"""Study `paper_cpu` (see README.md beside this file)."""
