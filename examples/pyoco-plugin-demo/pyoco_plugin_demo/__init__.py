"""Example pyoco plugin tasks.

`Shout` is published directly as the entry point ``shout``; the
``register`` hook adds two more tasks under its own entry point.
"""
import pyoco


class Shout(pyoco.Task):
    """Upper-case a text and add some excitement."""

    def run(self, ctx, text, marks=1):
        return text.upper() + "!" * marks


class WordCount(pyoco.Task):
    """Count the words of a text."""

    name = "word_count"

    def run(self, ctx, text):
        return len(text.split())


class Reverse(pyoco.Task):
    """Reverse a text, character by character."""

    name = "reverse"

    def run(self, ctx, text):
        return text[::-1]


def register(registry):
    """Add this distribution's text tasks."""
    registry.add(WordCount)
    registry.add(Reverse)
