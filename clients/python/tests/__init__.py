"""Tests of botflow_client against a real daemon, started by tests/clients.rs."""
