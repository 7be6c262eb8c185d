"""Packaging glue that pyproject.toml alone cannot express.

The top-level folders install as the ``fastdecode.*`` namespace: ``actors/`` is
``fastdecode.actors`` and so on, for normal and editable installs alike.
"""
import os

from setuptools import setup

TOP_LEVEL = ("actors", "transport", "native", "scheduler", "cli")


def _packages():
    packages, package_dir = [], {}
    for top in TOP_LEVEL:
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")) and d != "csrc")
            if "__init__.py" in files:
                name = "fastdecode." + root.replace(os.sep, ".")
                packages.append(name)
                package_dir[name] = root
    return packages, package_dir


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir)
