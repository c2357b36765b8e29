"""The one place astra_cannon reads configuration.

Precedence, highest first:

1. environment variables (``ASTRA_CANNON_<OPTION>``, e.g. ``ASTRA_CANNON_DATABASE_URL``);
2. the ``[astra_cannon]`` section of Luigi's own configuration (``luigi.cfg``, ``LUIGI_CONFIG_PATH``);
3. the built-in default.

Known options:

``database_url``
    peewee ``playhouse.db_url`` URL; default ``sqlite:///<work_dir>/astra_cannon.sqlite``.
``work_dir``
    directory for model files, per-chunk outputs and the default SQLite file;
    default ``./astra_cannon_work`` (created on demand).
"""

from __future__ import annotations

import os
import warnings
import pathlib

ENV_PREFIX = "ASTRA_CANNON_"
SECTION = "astra_cannon"
_MISSING = object()


def _luigi_config():
    # Imported lazily so that numerics users never pay for Luigi. Luigi warns on import that
    # its range-task autoloading default will change; astra_cannon does not use range tasks.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Autoloading range tasks", category=DeprecationWarning)
        from luigi.configuration import get_config

    return get_config()


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def get(option: str, default=None, type=str):
    """Return an ``[astra_cannon]`` option: environment, then Luigi config, then ``default``.

    Parameters
    ----------
    option : str
        Option name, e.g. ``"database_url"``. The environment variable is
        ``ASTRA_CANNON_<OPTION>`` in upper case.
    default : object, optional
        Returned (unconverted) when the option is set nowhere.
    type : callable, optional
        Converter applied to the configured string (``str``, ``int``, ``float`` or ``bool``;
        ``bool`` accepts 1/0, true/false, yes/no, on/off).

    Returns
    -------
    object
        The converted value, or ``default``.

    Raises
    ------
    ValueError
        When the configured text cannot be converted with ``type``.
    """
    raw = os.environ.get(ENV_PREFIX + option.upper())
    if raw is None:
        value = _luigi_config().get(SECTION, option, _MISSING)
        if value is _MISSING or value is None:
            return default
        raw = value
    if type is bool:
        return _parse_bool(str(raw))
    try:
        return type(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"[{SECTION}] {option} = {raw!r} is not a valid {getattr(type, '__name__', type)}") from exc


def work_dir() -> pathlib.Path:
    """Return the working directory (created if missing).

    Returns
    -------
    pathlib.Path
        Absolute path from ``ASTRA_CANNON_WORK_DIR``, else ``[astra_cannon] work_dir``,
        else ``./astra_cannon_work``.
    """
    path = pathlib.Path(get("work_dir", "astra_cannon_work")).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    """Return the database URL.

    Returns
    -------
    str
        ``ASTRA_CANNON_DATABASE_URL``, else ``[astra_cannon] database_url``, else a SQLite
        file ``astra_cannon.sqlite`` inside :func:`work_dir`.
    """
    url = get("database_url")
    if url:
        return url
    return f"sqlite:///{work_dir() / 'astra_cannon.sqlite'}"
