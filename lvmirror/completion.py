"""Shell completion of volume names, read from the configuration the way the commands read it.

Click calls :func:`volume_names` on every <Tab> (``_LVMIRROR_COMPLETE=bash_complete``,
from the script in ``contrib/bash-completion/``).  Whatever goes wrong (no configuration,
one this user cannot read, one that does not load) it offers nothing: a completion must
never print an error or a traceback into the line being typed.
"""

from __future__ import annotations

import click
from click.shell_completion import CompletionItem


def volume_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The configured volumes whose names start with ``incomplete``, sorted; [] if there is no config.

    The file is the one the command would read: ``-c``/``--config`` given earlier on the
    line, else ``$LVMIRROR_CONFIG``, else ``/etc/lvmirror/lvmirror.toml``.  Volumes already
    given to the same argument (``status web db``) are not offered again.
    """
    try:
        names = configured_volumes(ctx)
    except Exception:  # noqa: BLE001 - any failure means no names, never a message (see the module)
        return []
    taken = _already_given(ctx, param)
    return [CompletionItem(name) for name in sorted(names)
            if name.startswith(incomplete) and name not in taken]


def configured_volumes(ctx: click.Context) -> list[str]:
    """The volume names of the configuration the command line names (ConfigError if it does not load)."""
    from lvmirror import config
    path = ctx.find_root().params.get("config_path")
    return list(config.load(path if isinstance(path, str) else None).volumes)


def _already_given(ctx: click.Context, param: click.Parameter) -> set[str]:
    given = ctx.params.get(param.name) if param.name else None
    return set(given) if isinstance(given, tuple) else set()
