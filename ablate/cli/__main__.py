"""`python -m ablate.cli …` runs the command line (as `accelerate launch -m ablate.cli` and `torchrun` do)."""

from ablate.cli import main

main()
