"""Federated fine-tuning entry point: python scripts/train_federated.py with site_ids=[0,0,1,1] ...

Imports stay under the main guard: site workers are spawned and re-import this file.
"""

if __name__ == "__main__":
    from scaling_fl.cli import run_and_exit

    run_and_exit()
