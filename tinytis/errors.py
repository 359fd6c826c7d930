"""User-facing errors: one line that names the problem and what to do, exit code 2."""
import argparse
import sys


class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a file). Printed as one line, never a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line on stderr and exits 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main):
    """Run a CLI entry point, turning UserError into a one-line message and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def comma_list(kind):
    """An argparse type: 'a,b,c' -> [kind(a), kind(b), kind(c)]; a value kind rejects is a UserError."""
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"{text!r} is not a comma-separated list of {kind.__name__} values")
    return parse
