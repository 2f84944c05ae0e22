"""Security: authentication, rate limits, input sanitization and the audit trail."""
