"""`precision: fp16` against `fp32` on the same fine-tuning recipe: test accuracy and time per seed.

    python bench/precision_parity.py [--recipe configs/mobilenet_v1_dogs_cats.yaml] [--seeds 0 1] [--epochs N]

fp16 stores the cached features and the activations kept for the backward pass as IEEE half; arithmetic stays
float32. Each seed runs both precisions on the same split; prints the accuracies, their difference in points and
the mean difference (the target: within 0.5 points).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=os.path.join(ROOT, "configs", "mobilenet_v1_dogs_cats.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    from transfercl_cli.recipe import load_recipe
    from transfercl_cli.train import finetune

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            row = {"seed": seed}
            for prec in ("fp32", "fp16"):
                ov = {"train.seed": seed, "precision": prec, "output": os.path.join(tmp, f"{prec}{seed}"),
                      "device": args.device}
                if args.epochs:
                    ov["train.epochs"] = args.epochs
                t0 = time.perf_counter()
                res = finetune(load_recipe(args.recipe, ov), quiet=True, log=lambda *a: None)
                row[prec] = {"accuracy": res["metrics"]["accuracy"], "seconds": round(time.perf_counter() - t0, 1)}
            row["difference_points"] = round(100 * (row["fp16"]["accuracy"] - row["fp32"]["accuracy"]), 2)
            rows.append(row)
            print(f"seed {seed}: fp32 {row['fp32']['accuracy']:.4f} ({row['fp32']['seconds']} s), fp16 "
                  f"{row['fp16']['accuracy']:.4f} ({row['fp16']['seconds']} s): {row['difference_points']:+.2f} "
                  "points", flush=True)
    mean = statistics.mean(r["difference_points"] for r in rows)
    print(f"\nmean difference fp16 - fp32 over seeds {args.seeds}: {mean:+.2f} points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "mean_difference_points": mean}, f, indent=2)


if __name__ == "__main__":
    main()
