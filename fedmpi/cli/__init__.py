"""Command lines: argument parsing for every entry point, and nothing else.

Each module has `main(argv) -> exit code`. `python -m fedmpi.train` (and `.evaluate`,
`.sweep`, `.report`, `.plot`, `.summary`, `.comm`, `.data split`) and the `fedmpi`
console command (`fedmpi train ...`, see `__main__.py` of the package) call these.

May import: everything.
"""
