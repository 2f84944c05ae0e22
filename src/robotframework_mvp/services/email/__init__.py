"""Helpers of the email monitor: configuration, the IMAP session, message parsing.

The plugin itself, and the names users import, live in
``robotframework_mvp.services.email_monitor``.
"""
