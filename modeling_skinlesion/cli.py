"""The help layout of every script (imports only argparse, so a script with plain argparse can use it too)."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written (example commands keep their lines), and each option's default once, at the
    end of its help; required options and options without a default show none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.required or action.default in (None, [], argparse.SUPPRESS) or "%(default)" in help_text:
            return help_text
        if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{help_text} (default: {'on' if action.default else 'off'})"
        return f"{help_text} (default: %(default)s)"
