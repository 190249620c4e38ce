"""Every option of every command, declared once (see fields.py); this package imports nothing."""
