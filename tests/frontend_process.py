"""The frontend process for the tests, and the keys the session's frontend is started with."""

from scripts.frontend_launcher import FrontendProcess

API_KEY, ADMIN_KEY = "test-api-key", "test-admin-key"

__all__ = ["ADMIN_KEY", "API_KEY", "FrontendProcess"]
