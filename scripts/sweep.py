"""A sweep over config values and seeds, one run each, resumable; or its mean +- std report:
python scripts/sweep.py --name NAME --grid KEY=V1,V2 --seeds 0 1 2 -- key=value ...
python scripts/sweep.py --name NAME --report OUT [--runs-dir runs | --mongo-url URL]

The work is in scaling_fl/sweep.py.
"""

if __name__ == "__main__":
    from scaling_fl.sweep import main

    raise SystemExit(main(prog="sweep.py"))
