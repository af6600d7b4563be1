"""The package version, in a module of its own so the writer can stamp it without the
package ``__init__`` (which imports the writer)."""

__version__ = "0.1.0"
