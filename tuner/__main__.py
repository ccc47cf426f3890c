"""`python -m tuner`: the same CLI as the `tuner` console script (launch.py starts workers this way)."""

from tuner.cli import main

main()
