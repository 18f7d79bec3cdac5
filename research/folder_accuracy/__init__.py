"""Study `folder_accuracy` (see README.md beside this file)."""
