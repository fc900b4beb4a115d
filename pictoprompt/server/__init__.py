"""The MCP face of pictoprompt: the only floor that imports `mcp`."""
