"""The `headroom` command line, one module per job; `headroom.cli` assembles the app.

    errors.py             library errors -> one `error: ...` line and exit code 1; the root group
    root.py               the root's --version and --debug
    options.py            the options several commands share, each declared once
    output.py             consoles, tables, JSON, progress bars
    engine.py             opening the engine for a command (with or without an embedding model)
    serve.py, banner.py   `headroom serve`: flags -> ProxyConfig; what it prints before starting
    memories.py           the `memories` group, from memories_read, memories_write and
                          memories_transfer (export/import)
    stats.py              `headroom stats`
    doctor.py             `headroom doctor` and its checks
    outbox.py             the `outbox` group: queued writes and dead letters
    keys.py               the `keys` group: proxy keys (engineer E's)
"""
