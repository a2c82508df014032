"""A Telegram AI companion bot whose replies to one user run in turn, on inturn."""

__version__ = "0.1.0"
