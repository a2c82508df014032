"""Integrations with other libraries; each module imports only inturn's public API."""
