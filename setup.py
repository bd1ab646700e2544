"""The one part of the package layout pyproject.toml cannot state: the top-level config/
folder (the built-in configuration and the profile tables) ships as the package
``casemask_config``, read with importlib.resources (node.resources), without a copy. Data folders (templates,
migrations, bundles) are listed as namespace packages so that setuptools installs them
without its "Package would be ignored" warnings."""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["node", "node.*", "engine", "engine.*"], exclude=["*.__pycache__"]), "casemask_config"],
    package_dir={"casemask_config": "config"},
)
