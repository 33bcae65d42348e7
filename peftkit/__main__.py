import sys

from peftkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
