"""The run-folder contract: where every file of a run lives and what summary.json holds.

Training and inference write it, presentation and the integrations read it; it sits below
training so that neither has to reach up into presentation to find a path."""
