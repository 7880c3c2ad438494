"""Access: operator accounts, scopes, tokens and the login limiter, with their own store."""
