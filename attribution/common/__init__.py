"""The ground floor: helpers every package may use (files and atomic writes, seeds, devices).

Nothing here imports the rest of the project (an import-linter contract in ``pyproject.toml``
keeps it so).
"""
