"""Where `hmst-bench demo` finds its experiment file: the one shipped in this package (the
repository's experiments/demo.toml is a link to it, so there is one file)."""

from pathlib import Path

DEMO = Path(__file__).with_name("demo.toml")


def demo_file() -> Path:
    return DEMO
