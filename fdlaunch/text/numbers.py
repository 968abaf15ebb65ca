"""Numbers written in argv, the environment and files: ASCII decimal digits only.

str.isdigit() and int() also take other scripts' digits ('٥' is 5), so a
check made of them alone lets '--fd=٥' name fd 5.
"""

MODE_MAX = 0o777
# the kernel's largest pid_max (include/linux/threads.h, 64-bit)
PID_MAX_LIMIT = 4 * 1024 * 1024


def is_decimal(text):
    """True for a non-empty run of the ASCII digits 0-9, nothing else."""
    return text.isascii() and text.isdigit()


def octal_mode(text):
    """Permission bits as chmod(1) and umask take them: 1 to 4 octal digits, 0 to 0777.

    Raises ValueError saying what would be right; the caller puts the
    option and its value in front: "--umask='999': ...", "mode='8': ...".
    """
    if not (0 < len(text) <= 4 and set(text) <= set("01234567")) or int(text, 8) > MODE_MAX:
        raise ValueError(f"an octal mode is 1 to 4 digits 0-7, from 0000 to {MODE_MAX:04o}, e.g. 0660")
    return int(text, 8)
