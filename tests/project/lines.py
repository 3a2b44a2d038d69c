"""One line of a test script's output, written whole."""

import os


def say(line: str) -> None:
    """Write ``line`` and its newline to stdout in one system call. Ranks under torchrun share stdout; ``print``
    writes the text and the newline in two calls when stdout is unbuffered (``PYTHONUNBUFFERED``), and a peer's
    line can land between them. One write of at most PIPE_BUF (4096) bytes to a pipe is never split."""
    os.write(1, f"{line}\n".encode())
