"""handtrace: consent-first capture of computer-use activity for training computer-operating agents."""

__version__ = "0.1.0"
