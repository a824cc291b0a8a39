"""Kiln quickstart: logistic regression on synthetic data, standard library only.

Runs the same with or without Kiln:
    python3 train.py --epochs 8          # prints metrics to stderr
    kiln submit examples/quickstart train.py -- --epochs 8
"""

import argparse
import json
import math
import os
import random
import sys
import time

try:
    import kiln  # Put on PYTHONPATH by the Kiln agent.
except ImportError:  # Running without Kiln.
    kiln = None


def make_data(n, seed):
    rng = random.Random(seed)
    true_w = [1.5, -2.0, 0.7]
    data = []
    for _ in range(n):
        x = [rng.gauss(0, 1) for _ in true_w]
        z = sum(w * xi for w, xi in zip(true_w, x)) + rng.gauss(0, 0.5)
        data.append((x, 1 if z > 0 else 0))
    return data


def sigmoid(z):
    return 1 / (1 + math.exp(-max(-30.0, min(30.0, z))))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = make_data(args.samples, args.seed)
    w = [0.0, 0.0, 0.0]
    b = 0.0
    print(f"training on {len(data)} samples for {args.epochs} epochs (lr={args.lr})", flush=True)
    for epoch in range(1, args.epochs + 1):
        started = time.monotonic()
        loss = 0.0
        correct = 0
        for x, y in data:
            p = sigmoid(sum(wi * xi for wi, xi in zip(w, x)) + b)
            loss -= y * math.log(p + 1e-12) + (1 - y) * math.log(1 - p + 1e-12)
            correct += (p > 0.5) == (y == 1)
            grad = p - y
            w = [wi - args.lr * grad * xi for wi, xi in zip(w, x)]
            b -= args.lr * grad
        loss /= len(data)
        accuracy = correct / len(data)
        print(f"epoch {epoch}: loss={loss:.4f} accuracy={accuracy:.4f}", flush=True)
        if kiln is not None:
            kiln.log_many({"loss": loss, "accuracy": accuracy}, step=epoch)
        # Keep each epoch visible in the streamed log, like a real (slower) training step.
        time.sleep(max(0.0, 0.3 - (time.monotonic() - started)))

    outputs = kiln.outputs_dir() if kiln is not None else "outputs"
    os.makedirs(outputs, exist_ok=True)
    with open(os.path.join(outputs, "model.json"), "w") as f:
        json.dump({"weights": w, "bias": b, "loss": loss, "accuracy": accuracy}, f, indent=2)
    print("wrote outputs/model.json", flush=True)
    if accuracy < 0.8:
        print("accuracy below 0.8: something is wrong", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
