"""The command lines: each parses its flags into the config tree (`config.entry_config`),
saves the resolved config beside its output and calls the library. Console scripts in
pyproject.toml; `python -m bld_t2i.cli.<name>` works too."""
