"""Adds the top-level ``tasks/`` tree as the ``harness.tasks`` package (its folder sits outside ``harness/``,
so ``packages.find`` in pyproject.toml cannot see it under that name); everything else is in pyproject.toml."""
from setuptools import find_namespace_packages, find_packages, setup

packages = find_packages(include=["harness*", "baselines*", "leaderboard*"])
tasks = ["harness.tasks"] + [f"harness.tasks.{p}" for p in find_namespace_packages("tasks")]
setup(packages=packages + tasks, package_dir={"harness.tasks": "tasks"})
