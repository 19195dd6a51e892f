"""Run artifacts: the run folder layout, summary.json, plots, REPORT.md, dashboard, leaderboard."""
