"""The hooks a plugin may implement. Each receives a `register` callback (or the CLI group).

A plugin is any module or object with functions decorated by `hmst_bench.hookimpl`, found
through the `hmst_bench` entry-point group of an installed distribution:

    [project.entry-points.hmst_bench]
    my_arch = "my_package.plugin"
"""

import pluggy

hookspec = pluggy.HookspecMarker("hmst_bench")
hookimpl = pluggy.HookimplMarker("hmst_bench")


@hookspec
def register_architectures(register):
    """Call `register(ArchSpec(...))` once per architecture this plugin provides."""


@hookspec
def register_suites(register):
    """Call `register(SuiteSpec(...))` once per evaluation suite this plugin provides."""


@hookspec
def register_commands(cli):
    """Add click commands to the `hmst-bench` group, e.g. `@cli.command() def my_cmd(): ...`."""
