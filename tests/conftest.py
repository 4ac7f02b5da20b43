"""Shared fixtures: real peers are started by the plugin modules in tests/peers/."""

pytest_plugins = [
    "tests.peers.openbao",
    "tests.peers.sql_cache",
    "tests.peers.broker",
    "tests.peers.moto",
    "tests.peers.keystone",
]
