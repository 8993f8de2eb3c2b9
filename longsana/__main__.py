"""`python -m longsana ...`: the `longsana` command (cli.py), through the same entry and settings."""

from longsana.cli import main

if __name__ == "__main__":  # importing the module (as the import-everything test does) runs nothing
    main(prog_name="longsana")
