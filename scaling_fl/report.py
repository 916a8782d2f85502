"""`python -m scaling_fl.report`: figures and tables of tracked runs (see scaling_fl/tracking/report.py)."""

from scaling_fl.tracking.report import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m scaling_fl.report"))
