"""`python -m longsana ...`: the `longsana` command (cli.py), through the same entry and settings."""

from longsana.cli import main

main(prog_name="longsana")
