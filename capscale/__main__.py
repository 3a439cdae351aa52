"""`python -m capscale`: the same command line as the `capscale` script, and like it, no module is imported from the
working directory (`python -m` puts it first on sys.path, as `python -P` would not): a `seaborn.py` or `torch.py`
lying there is not code the user asked to run. `--plugin` still finds a plugin module there, by the user's act."""
import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from capscale.cli import main  # noqa: E402  (after the working directory left sys.path)

if __name__ == "__main__":  # a spawned sweep worker may import this module: it must not run the command again
    sys.exit(main())
