"""Figures and a final-metrics table for runs:
python scripts/plot_runs.py JOB_OR_ID ... [--runs-dir runs | --mongo-url URL]

The work is in scaling_fl/tracking/report.py (also: python -m scaling_fl.report).
"""

if __name__ == "__main__":
    from scaling_fl.tracking.report import main

    raise SystemExit(main(prog="plot_runs.py"))
