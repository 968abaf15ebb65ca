"""One module per tool: its docopt usage and a main that reads like a recipe."""
