"""Redis: key names, Lua scripts, the job state machine, schedules and limits."""
