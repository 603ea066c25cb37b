"""The package version, in one place (no upward imports from the application)."""

__version__ = "0.1.0"
