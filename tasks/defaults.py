"""The Luigi defaults shipped with astra_cannon (``luigi.cfg`` next to this module).

They are installed at the lowest priority: an option already set by any Luigi configuration
file (``/etc/luigi/luigi.cfg``, ``./luigi.cfg``, ``LUIGI_CONFIG_PATH``) is left alone.
"""

from __future__ import annotations

import configparser
from pathlib import Path

DEFAULTS_PATH = Path(__file__).with_name("luigi.cfg")


def read_defaults(path=DEFAULTS_PATH) -> dict:
    """Return the shipped defaults as ``{section: {option: value}}``.

    Raises
    ------
    FileNotFoundError
        When the file is missing (a broken installation).
    """
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.optionxform = str
    with open(path, encoding="utf-8") as fh:
        parser.read_file(fh)
    return {section: dict(parser.items(section)) for section in parser.sections()}


def install_luigi_defaults(path=DEFAULTS_PATH) -> dict:
    """Fill Luigi's configuration with the shipped defaults where nothing is configured.

    Returns
    -------
    dict
        ``{section: {option: value}}`` of the options actually installed.
    """
    from luigi.configuration import get_config

    cfg = get_config()
    installed = {}
    for section, options in read_defaults(path).items():
        for option, value in options.items():
            if cfg.has_option(section, option):
                continue
            if not cfg.has_section(section):
                cfg.add_section(section)
            cfg.set(section, option, value)
            installed.setdefault(section, {})[option] = value
    return installed
