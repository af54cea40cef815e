"""``python -m sitegen`` (also what ``torchrun -m sitegen`` runs)."""
from .cli import main

if __name__ == "__main__":
    main()
