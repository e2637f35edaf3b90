"""pytest plugins of the test suite (enabled from tests/conftest.py)."""
