"""Jobs: the job model and its validation, the jobs file, schedules and systemd timers."""
