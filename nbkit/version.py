"""The kit's version (one home: nbkit/__init__ and the run manifest read it)."""

__version__ = "0.1.0"
