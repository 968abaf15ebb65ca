"""Numbers written in argv, the environment and files: ASCII decimal digits only.

str.isdigit() and int() also take other scripts' digits ('٥' is 5), so a
check made of them alone lets '--fd=٥' name fd 5.
"""


def is_decimal(text):
    """True for a non-empty run of the ASCII digits 0-9, nothing else."""
    return text.isascii() and text.isdigit()
