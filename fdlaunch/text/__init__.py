"""Pure parsing: text in, values out. No system calls, no os.environ; imports only errors and this package."""
