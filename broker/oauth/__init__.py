"""The broker as an OAuth 2.0 authorization server and OpenID provider."""
