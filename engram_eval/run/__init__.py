"""Running a sweep or generation: the run's identity, results, run directory, executors."""
