"""`python -m mdkd ...` (what `torchrun -m mdkd` runs on every rank)."""

from mdkd.cli import main

main()
