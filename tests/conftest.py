"""Shared pytest configuration: fixture modules are registered here, one per area."""

pytest_plugins = [
    "fixtures_numerics",
    "fixtures_db",
    "fixtures_io",
    "fixtures_example",
]
