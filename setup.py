"""The one part of the package layout pyproject.toml cannot state: the top-level config/
folder (the built-in configuration and the profile tables) ships as the package
``casemask_config``, read with importlib.resources (node.resources), without a copy."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["node", "node.*", "engine", "engine.*"]), "casemask_config"],
    package_dir={"casemask_config": "config"},
)
