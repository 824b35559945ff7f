"""`python -m nbkit ...` and `accelerate launch -m nbkit ...`: see nbkit.cli."""

from nbkit.cli import entry

if __name__ == "__main__":
    entry()
