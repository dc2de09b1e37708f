"""`switchboard`: the command line. `up` runs the whole gateway locally; `<service>` runs one."""
