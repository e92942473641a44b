"""One command per paper table: plans of units (a command each, with declared outputs and a completeness check),
run locally or as a SLURM array, resumable, ending with the tables. CLI: ``script/reproduce/run.py``;
docs/reproduce.md."""
