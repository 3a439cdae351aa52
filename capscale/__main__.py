"""`python -m capscale`: the same command line as the `capscale` script."""
import sys

from capscale.cli import main

sys.exit(main())
