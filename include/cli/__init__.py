"""Every command-line entry point of the engine (``[project.scripts]`` points here)."""
