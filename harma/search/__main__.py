"""``python -m harma.search index | query | serve``."""

from .cli import main

if __name__ == "__main__":
    main()
