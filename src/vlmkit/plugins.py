"""Plugins: packages that add image schemes and model families to vlmkit's registries.

A plugin is a module that registers what it adds when it is imported (`vlmkit.schemes.register_scheme`,
`vlmkit.weights.hf.register_converter`, ...), declared as an entry point of the group `vlmkit.plugins`
in its package's pyproject.toml:

    [project.entry-points."vlmkit.plugins"]
    my_scheme = "my_package.my_scheme"

A registry that is asked for a name it does not know loads every plugin once (`load_plugins`) before it
says the name is unknown, so `--model` folders of a plugin's model types load without an import. vlmkit's
own demo is registered this way (pyproject.toml), the library itself never imports it.
"""

from __future__ import annotations

from importlib.metadata import entry_points

GROUP = "vlmkit.plugins"
_loaded = False


def load_plugins() -> None:
    """Import every module registered under the `vlmkit.plugins` entry-point group, once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in entry_points(group=GROUP):
        try:
            entry.load()
        except ImportError as e:
            raise ImportError(f"the vlmkit plugin {entry.name!r} ({entry.value}) failed to import: {e}; "
                              "reinstall it or uninstall the package that declares it") from e
