"""One method per file: its heads, its loss call, its forward. See base.Method for the contract."""
