"""Studies that train through the recipes and write reports; run from the repository root, not shipped in the wheel."""
