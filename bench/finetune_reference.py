"""tcl vs a PyTorch reference of the same fine-tuning recipe, on the same split, over several seeds.

    python bench/finetune_reference.py [--recipe configs/mobilenet_v1_dogs_cats.yaml] [--seeds 0 1 2] [--epochs N]

For each seed both run the recipe's job: the frozen prefix (everything before the first trainable layer, with
BatchNorm in inference mode) computed once per image, then the trainable layers (for the reference recipe
conv_pw_13 + its BatchNorm in training mode + ReLU6, global average pooling and a new dense head) trained with the
recipe's optimizer, learning rate, batch size and epochs; the test split is the recipe's stratified split. The
PyTorch side uses tcl only to read the .h5 weights and to make the split and the preprocessed images, so both see
identical inputs; everything it computes is PyTorch (CPU, 2 threads, channels_last).
Prints before/after test accuracy and times per seed, their means, and the difference.
Needs torch (`pip install torch==2.13.0`).
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def torch_prefix_features(torch, graph, x_all, batch=32):
    """Run a (folded) frozen prefix graph with torch ops; NHWC numpy in, NHWC numpy out."""
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for s in range(0, len(x_all), batch):
            env = {next(iter(graph.inputs)): torch.from_numpy(np.ascontiguousarray(x_all[s:s + batch]).transpose(0, 3, 1, 2))
                   .contiguous(memory_format=torch.channels_last)}
            for n in graph.nodes:
                x = env[n.inputs[0]]
                if n.op == "conv2d":
                    t, l, b, r = n.attrs["pads"]
                    x = F.pad(x, (l, r, t, b))
                    w = torch.from_numpy(n.params["weight"].transpose(3, 2, 0, 1).copy())
                    bias = torch.from_numpy(n.params["bias"]) if "bias" in n.params else None
                    y = F.conv2d(x, w, bias, stride=tuple(n.attrs["strides"]), dilation=tuple(n.attrs["dilations"]),
                                 groups=n.attrs["groups"])
                    act = n.attrs.get("act")
                    y = F.relu6(y) if act == "relu6" else F.relu(y) if act == "relu" else y
                elif n.op == "pad":
                    t, l, b, r = n.attrs["pads"]
                    y = F.pad(x, (l, r, t, b), value=float(n.attrs.get("value", 0.0)))
                elif n.op in ("relu6", "relu"):
                    y = F.relu6(x) if n.op == "relu6" else F.relu(x)
                elif n.op == "batchnorm":
                    p = {k: torch.from_numpy(v) for k, v in n.params.items()}
                    y = F.batch_norm(x, p["mean"], p["var"], p["gamma"], p["beta"], False, 0.0, n.attrs["eps"])
                    act = n.attrs.get("act")
                    y = F.relu6(y) if act == "relu6" else F.relu(y) if act == "relu" else y
                else:
                    raise SystemExit(f"the torch reference does not handle op {n.op} ({n.name})")
                env[n.outputs[0]] = y
            out.append(env[graph.outputs[0]].permute(0, 2, 3, 1).contiguous().numpy())
    return np.concatenate(out)


def torch_train(torch, plan, recipe, feats, y_train, test_feats, y_test, seed):
    """Train the suffix (conv_pw_13 + BN + ReLU6 + GAP + dense) in PyTorch; returns (initial acc, final acc, secs)."""
    import torch.nn as nn

    from transfercl_cli.plan import fused_label

    g = plan.suffix
    # tcl's execution graph carries the ReLU6 and the pool inside the BatchNorm node (attrs act, pool); the model is
    # the same.
    names = [fused_label(n) for n in g.nodes]
    if names not in (["conv2d", "batchnorm", "relu6", "global_avgpool", "dense"],
                     ["conv2d", "batchnorm+relu6", "global_avgpool", "dense"],
                     ["conv2d", "batchnorm+relu6+gap", "dense"]):
        raise SystemExit(f"the torch reference expects conv2d, batchnorm, relu6, gap, dense; got {names}")
    conv_n, bn_n, dense_n = g.nodes[0], g.nodes[1], g.nodes[-1]
    torch.manual_seed(seed)
    cin, cout = conv_n.params["weight"].shape[2:]
    conv = nn.Conv2d(cin, cout, 1, bias=False)
    conv.weight.data = torch.from_numpy(conv_n.params["weight"].transpose(3, 2, 0, 1).copy())
    bn = nn.BatchNorm2d(cout, eps=bn_n.attrs["eps"], momentum=1 - bn_n.attrs["momentum"])
    bn.weight.data = torch.from_numpy(bn_n.params["gamma"].copy())
    bn.bias.data = torch.from_numpy(bn_n.params["beta"].copy())
    bn.running_mean.data = torch.from_numpy(bn_n.params["mean"].copy())
    bn.running_var.data = torch.from_numpy(bn_n.params["var"].copy())
    k = dense_n.params["weight"].shape[1]
    fc = nn.Linear(cout, k)
    gen = torch.Generator().manual_seed(seed)
    lim = math.sqrt(6.0 / (cout + k))  # Glorot uniform, as Keras and tcl initialise a new Dense
    fc.weight.data = (torch.rand(k, cout, generator=gen) * 2 - 1) * lim
    fc.bias.data.zero_()
    model = nn.Sequential(conv, bn, nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    model = model.to(memory_format=torch.channels_last)
    t = recipe["train"]
    opt = torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=0.0 if t["optimizer"] == "sgd" else t["momentum"],
                          nesterov=t["optimizer"] == "nesterov")
    if t["optimizer"] not in ("sgd", "momentum", "nesterov"):
        opt = torch.optim.Adam(model.parameters(), lr=t["lr"]) if t["optimizer"] == "adam" else \
            torch.optim.AdamW(model.parameters(), lr=t["lr"])
    lossf = nn.CrossEntropyLoss()
    xt = torch.from_numpy(feats.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)
    yt = torch.from_numpy(y_train.astype(np.int64))
    xe = torch.from_numpy(test_feats.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)

    def test_acc():
        model.eval()
        with torch.no_grad():
            return float((model(xe).argmax(1).numpy() == y_test).mean())

    initial = test_acc()
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    for epoch in range(t["epochs"]):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(yt)))
        for s in range(0, len(yt), t["batch_size"]):
            idx = perm[s:s + t["batch_size"]]
            opt.zero_grad()
            loss = lossf(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    secs = time.perf_counter() - t0
    return initial, test_acc(), secs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=os.path.join(ROOT, "configs", "mobilenet_v1_dogs_cats.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from transfercl_cli.data import ImageLoader
    from transfercl_cli.recipe import load_recipe
    from transfercl_cli.train import Session, finetune

    rows = []
    torch_feats = None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            ov = {"train.seed": seed, "output": os.path.join(tmp, f"run{seed}"), "device": args.device}
            if args.epochs:
                ov["train.epochs"] = args.epochs
            recipe = load_recipe(args.recipe, ov)
            t0 = time.perf_counter()
            res = finetune(recipe, quiet=True, log=lambda *a: None)
            tcl_secs = time.perf_counter() - t0
            tcl_init = res["meta"]["initial_accuracy"]
            tcl_acc = res["metrics"]["accuracy"]
            # PyTorch: same split, same preprocessed images, its own prefix features (once) and training.
            s = Session(recipe, log=lambda *a: None)
            if not s.plan.use_cache:
                raise SystemExit("this reference needs a recipe whose frozen prefix can be cached")
            if torch_feats is None:
                tp0 = time.perf_counter()
                torch_feats = {}
                for split in ("train", "test"):
                    xs, ys = [], []
                    for x, y, _ in ImageLoader(s.splits[split], batch_size=64, preprocess=s.pre):
                        xs.append(x)
                        ys.append(y)
                    xall = np.concatenate(xs)
                    torch_feats[split] = (torch_prefix_features(torch, s.plan.prefix, xall), np.concatenate(ys))
                torch_prefix_secs = time.perf_counter() - tp0
            (ftr, ytr), (fte, yte) = torch_feats["train"], torch_feats["test"]
            t_init, t_acc, t_secs = torch_train(torch, s.plan, recipe, ftr, ytr, fte, yte, seed)
            row = {"seed": seed, "tcl_initial": tcl_init, "tcl_accuracy": tcl_acc, "tcl_seconds": round(tcl_secs, 1),
                   "tcl_cache": res["meta"]["cache"], "torch_initial": t_init, "torch_accuracy": t_acc,
                   "torch_train_seconds": round(t_secs, 1), "torch_prefix_seconds": round(torch_prefix_secs, 1),
                   "epochs": recipe["train"]["epochs"]}
            rows.append(row)
            print(f"seed {seed}: tcl {tcl_init:.4f} -> {tcl_acc:.4f} in {tcl_secs:.1f} s (cache "
                  f"{res['meta']['cache']['misses']} computed, {res['meta']['cache']['hits']} reused) | torch "
                  f"{t_init:.4f} -> {t_acc:.4f}, training {t_secs:.1f} s + prefix {torch_prefix_secs:.1f} s once",
                  flush=True)
    mt = statistics.mean(r["tcl_accuracy"] for r in rows)
    mp = statistics.mean(r["torch_accuracy"] for r in rows)
    print(f"\nmean test accuracy over seeds {args.seeds}: tcl {mt:.4f}, PyTorch {mp:.4f}, difference "
          f"{100 * (mt - mp):+.2f} points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "tcl_mean": mt, "torch_mean": mp}, f, indent=2)


if __name__ == "__main__":
    main()
