"""Studies of edgetrain: each folder is one study (scripts, results, README, tests).

Not part of the installed package: run from a checkout, e.g. `python -m research.paper_cpu.run`.
"""
