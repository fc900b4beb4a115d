"""pictoprompt: an MCP server for interpretable text-to-image work (image <-> readable prompt)."""

__version__ = "0.1.0"
