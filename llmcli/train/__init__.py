"""Training: schedule.py (pure, resumable pieces: lr, batches, counters), run_dir.py (what a run
directory holds; the rules for --out / --resume / --init-from), report.py (progress and summary),
loop.py (the Accelerate loop and `llmcli train`)."""
