"""Study `finetune` (see README.md beside this file)."""
