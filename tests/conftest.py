"""Shared fixtures: real peers are started by the plugin modules in tests/peers/."""

pytest_plugins = [
    "tests.peers.openbao",
    "tests.peers.sql_cache",
    "tests.peers.broker",
    "tests.peers.moto",
    "tests.peers.keystone",
    "tests.peers.lti_platform",
    "tests.peers.git_http",
    "tests.peers.github_api",
    "tests.peers.gitlab_api",
    "tests.peers.bitbucket_api",
    "tests.peers.globus_auth",
]
