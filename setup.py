"""Package metadata lives in setup.cfg; this file keeps `pip install -e .` working on old pips."""
from setuptools import setup

setup()
