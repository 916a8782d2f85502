"""One AdamW step of a site, torch's per-tensor loop against its fused kernel, and a whole small job.

A site's local step is forward, backward and optimizer step. On the CPU, torch's default AdamW is a
loop over the tensors that allocates temporaries as big as each one; for models whose parameters
are one big embedding and many small tensors (tiny-bert: 1.95 M of its 2.06 M values are word
embeddings; MiniLM: 11.7 M of 22.7 M) the step costs more than forward and backward together.
scaling_fl.train.local.make_optimizer asks for the fused kernel (the HF Trainer's default,
adamw_torch_fused). This measures, in one process, on the models the tests and users run:

  step ms     median over --steps steps (after 5 warm-up steps) of optimizer.step(), loop and fused
  fwd+bwd ms  the same steps' forward and backward, for scale
  max diff    the largest difference between the two after --steps steps from the same start

    .venv/bin/python bench/optimizer_step.py                    # tiny-bert and MiniLM, 1 thread
    .venv/bin/python bench/optimizer_step.py --models tiny-bert --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from scaling_fl import models
from scaling_fl.flat_state import flatten_model_


def measure(model_name: str, fused: bool, steps: int, batch: int, seq: int) -> tuple[float, float, torch.Tensor, int]:
    model = models.load_model(model_name, num_labels=4, seed=0)
    parameters = sum(p.numel() for p in model.parameters())
    flat = flatten_model_(model)  # as a site holds it: parameters are views of one buffer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=False if not fused else None)
    generator = torch.Generator().manual_seed(0)
    step_s, pass_s = [], []
    for _ in range(steps + 5):
        ids = torch.randint(1000, 2000, (batch, seq), generator=generator)
        labels = torch.randint(0, 4, (batch,), generator=generator)
        started = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        stepped = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        pass_s.append(stepped - started)
        step_s.append(time.perf_counter() - stepped)
    return 1000 * statistics.median(step_s[5:]), 1000 * statistics.median(pass_s[5:]), flat.clone(), parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-bert", "minilm"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        loop_step, loop_pass, loop_weights, parameters = measure(name, False, args.steps, args.batch, args.seq)
        fused_step, fused_pass, fused_weights, _ = measure(name, True, args.steps, args.batch, args.seq)
        row = {
            "model": name,
            "parameters_m": round(parameters / 1e6, 2),
            "loop_step_ms": round(loop_step, 1),
            "fused_step_ms": round(fused_step, 1),
            "speedup": round(loop_step / fused_step, 1),
            "fwd_bwd_ms": round((loop_pass + fused_pass) / 2, 1),
            "max_diff": float((loop_weights - fused_weights).abs().max()),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| model | parameters | AdamW step, loop | AdamW step, fused | speed-up | forward + backward | max diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['parameters_m']} M | {r['loop_step_ms']} ms | {r['fused_step_ms']} ms | "
            f"{r['speedup']}x | {r['fwd_bwd_ms']} ms | {r['max_diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
