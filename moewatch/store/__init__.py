"""Store: the run-directory format, its writer and its reader."""
