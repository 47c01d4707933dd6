"""The `headroom` command line, one module per job; `headroom.cli` assembles the app.

    errors.py     library errors → one `error: ...` line and exit code 1; the root group
    options.py    the options several commands share, each declared once
    output.py     consoles, tables, JSON, progress bars
    engine.py     opening the engine for a command (with or without an embedding model)
    serve.py      `headroom serve` and the startup summary
    memories.py   the `memories` group, assembled from memories_read/_write and transfer
    stats.py      `headroom stats`
    doctor.py     `headroom doctor` and its checks
    outbox.py     the `outbox` group: queued writes and dead letters
"""
