"""Shim for tools that still call setup.py; the build is configured in pyproject.toml."""

from setuptools import setup

setup()
