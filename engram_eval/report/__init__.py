"""Reading a run: statistics, evidence, experiments, the summary, its sections and renderers, the gate."""
