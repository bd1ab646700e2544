"""casemask's data files (installed as the package ``casemask_config``): the built-in
configuration ``casemask.toml`` and the PS3.15 Annex E table ``annex_e.json``. Read
them with :func:`node.resources.config_file`; ``tools/`` (how they are made) is not
shipped."""
