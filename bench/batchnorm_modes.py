"""train.batchnorm: inference vs batch on the shipped sample recipe (and, with --reference, the reference recipe).

For each mode and epoch count: test accuracy, the last epoch's training accuracy (as reported during training) and
the training split's accuracy in inference mode (the model as it will be used), so the gap the warning is about is
visible. Same split, seed and device for both modes; the feature cache is shared.

    python bench/batchnorm_modes.py                      # sample recipe, 3 / 10 / 30 epochs
    python bench/batchnorm_modes.py --epochs 3 10 --seeds 0 1
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(recipe_path, mode, epochs, seed, out):
    from transfercl_cli.recipe import load_recipe
    from transfercl_cli.train import finetune

    r = load_recipe(recipe_path, {"train.epochs": epochs, "train.seed": seed, "output": out})
    r["train"]["batchnorm"] = {"default": mode}
    t0 = time.perf_counter()
    res = finetune(r, quiet=True, log=lambda *a: None, force=True)
    gap = res["meta"].get("batchnorm_gap") or {}
    row = {"mode": mode, "epochs": epochs, "seed": seed, "test_accuracy": res["metrics"]["accuracy"],
           "train_accuracy_reported": res["history"][-1]["train_accuracy"],
           "train_accuracy_inference_mode": gap.get("train_accuracy_inference_mode"),
           "seconds": round(time.perf_counter() - t0, 1)}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=os.path.join(ROOT, "configs", "sample_dogs_cats.yaml"))
    ap.add_argument("--epochs", type=int, nargs="+", default=[3, 10, 30])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for epochs in a.epochs:
                for mode in ("batch", "inference"):  # alternate the contenders
                    row = run(a.recipe, mode, epochs, seed, os.path.join(tmp, f"{mode}_{epochs}_{seed}"))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(f"\nrecipe {os.path.relpath(a.recipe, ROOT)}; load average {os.getloadavg()[0]:.2f}")
    print("| epochs | seed | mode | test accuracy | training accuracy (reported) | training split, inference mode |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        inf = r["train_accuracy_inference_mode"]
        print(f"| {r['epochs']} | {r['seed']} | {r['mode']} | {r['test_accuracy']:.4f} | "
              f"{r['train_accuracy_reported']:.4f} | {'(same: no batch statistics)' if inf is None else f'{inf:.4f}'} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
