"""`python -m fedkeeper.cli`: the same as the `fedkeeper` command."""
from . import main

main()
