"""Static int8 ONNX export against the float one, in onnxruntime, in the same run (issue 16).

    python bench/bench_int8.py [RUN_DIR] [--rounds 7] [--threads 2] [--batches 1 8] [--json FILE]

RUN_DIR (default runs/sample_dogs_cats, which `make demo` writes) is exported twice with `tcl export-weights`:
float32 and `--int8` (static: int8 weights, uint8 activations, QDQ). Both files then run in onnxruntime on the same
test-split images: per batch size, rounds alternate float and int8 sessions (each timing the median of several
calls after a warm-up), and the medians over rounds give images/s and the int8/float time ratio. Also printed: file
sizes, test accuracy of each file in onnxruntime and tcl's, the integer kernels onnxruntime fused, and the load.
onnxruntime is a benchmark-only dependency (`pip install onnxruntime`).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def session(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def layout(sess, x):
    """x (NHWC) as the session's input wants it: a float export of a model fine-tuned from an ONNX file keeps that
    file's input (often NCHW); tcl's own exports take NHWC."""
    shape = sess.get_inputs()[0].shape
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if shape[1] == x.shape[3] != shape[3] else x


def time_calls(sess, x, calls):
    x = layout(sess, x)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})  # warm-up
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        sess.run(None, {name: x})
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def accuracy(sess, x, y):
    x = layout(sess, x)
    name = sess.get_inputs()[0].name
    z = np.concatenate([sess.run(None, {name: x[i:i + 32]})[0] for i in range(0, len(x), 32)])
    return float(np.mean(np.argmax(z, 1) == y))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", nargs="?", default=os.path.join(ROOT, "runs", "sample_dogs_cats"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    from transfercl_cli.evaluate import _model_preprocess, run_eval_items
    from transfercl_cli.export_run import _decode, export_run
    from transfercl_cli.runfile import load_run_model

    if not os.path.isdir(args.run_dir):
        sys.exit(f"{args.run_dir} is not a run directory: run `make demo` first, or pass one.")
    with tempfile.TemporaryDirectory() as tmp:
        f32, i8 = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "model_int8.onnx")
        export_run(args.run_dir, "onnx", output=f32)
        t = time.perf_counter()
        q = export_run(args.run_dir, "onnx", output=i8, int8=True)["int8"]
        export_s = time.perf_counter() - t
        x, y = _decode(run_eval_items(args.run_dir), _model_preprocess(load_run_model(args.run_dir)))
        sess = {"float32": session(f32, args.threads), "int8": session(i8, args.threads)}
        res = {"run_dir": args.run_dir, "threads": args.threads, "rounds": args.rounds,
               "size_mb": {"float32": os.path.getsize(f32) / 1e6, "int8": os.path.getsize(i8) / 1e6},
               "accuracy_onnxruntime": {k: accuracy(s, x, y) for k, s in sess.items()},
               "accuracy_tcl": {"float32": q["accuracy_fp32"], "int8": q["accuracy_int8"]},
               "kept_float": q["kept_float"], "integer_ops": q.get("onnxruntime_integer_ops"),
               "export_int8_s": export_s, "load_before": os.getloadavg()[0], "batches": {}}
        for b in args.batches:
            xb = np.ascontiguousarray(np.resize(x, (b,) + x.shape[1:]))
            calls = max(3, 24 // b)
            per = {"float32": [], "int8": []}
            for r in range(args.rounds):
                order = ("float32", "int8") if r % 2 == 0 else ("int8", "float32")  # alternate who goes first
                for k in order:
                    per[k].append(time_calls(sess[k], xb, calls))
            med = {k: statistics.median(v) for k, v in per.items()}
            res["batches"][b] = {"img_per_s": {k: b / v for k, v in med.items()},
                                 "int8_time_over_float": med["int8"] / med["float32"]}
        res["load_after"] = os.getloadavg()[0]
    print(f"run {args.run_dir}: onnxruntime, {args.threads} threads, {args.rounds} alternating rounds, "
          f"load {res['load_before']:.2f} -> {res['load_after']:.2f}")
    print(f"size: float32 {res['size_mb']['float32']:.1f} MB, int8 {res['size_mb']['int8']:.1f} MB; "
          f"int8 export {export_s:.0f} s; kept float: {', '.join(q['kept_float']) or 'none'}; "
          f"integer kernels: {res['integer_ops']}")
    print(f"test accuracy: float32 {res['accuracy_onnxruntime']['float32']:.4f}, int8 "
          f"{res['accuracy_onnxruntime']['int8']:.4f} in onnxruntime (tcl: {q['accuracy_fp32']:.4f} -> "
          f"{q['accuracy_int8']:.4f}, {len(y)} images)")
    print("| batch | float32 img/s | int8 img/s | int8 time / float time |")
    print("|---|---|---|---|")
    for b, r in res["batches"].items():
        print(f"| {b} | {r['img_per_s']['float32']:.1f} | {r['img_per_s']['int8']:.1f} | "
              f"{r['int8_time_over_float']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
