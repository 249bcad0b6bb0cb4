"""Time the train step, the eval forward or the data pipeline (protocol: ../shared/DESIGN.md, performance note).

    python tools/benchmark.py train -c configs/dfine_n_coco.yml           # forward, criterion, backward, clip, step; EMA apart
    python tools/benchmark.py eval -c configs/dfine_s_coco.yml            # eval-mode forward latency
    python tools/benchmark.py eval -c configs/dfine_s_coco.yml --channels-last  # the same, deploy form run NHWC
    python tools/benchmark.py data -c configs/dfine_n_demo.yml            # images/s of the train loader
    python tools/benchmark.py model -c configs/dfine_n_coco.yml           # params, FLOPs, eval latency: eager, deploy
                                                                          # channels-last, compiled, onnxruntime
    python tools/benchmark.py all -c configs/dfine_n_coco.yml             # model + train + data, one table
    python tools/benchmark.py train -c configs/dfine_n_coco.yml --profile # + torch.profiler top ops (forward, backward)

Defaults: fp32 on the CPU, torch.set_num_threads(2), 640x640, batch 2 (train, with the reference's targets_640
from ../shared/reference/inputs.pt when present) or 1 (eval), median of 5 timed runs after 2 warm-ups.
Prints a table and writes JSON (--json). ``*_cpu`` rows are this process's CPU time (all threads) for the same
work: on a loaded machine, the CPU time of a ``--threads 1`` run estimates the idle single-thread wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dfine.cli.common import run_tool
from dfine.utils.allocator import retain_freed_memory

REFERENCE_INPUTS = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "inputs.pt"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("train", "eval", "data", "model", "all"))
    parser.add_argument("-c", "--config", default="configs/dfine_n_coco.yml")
    parser.add_argument("-u", "--update", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("-d", "--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0 leaves it alone)")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--batch-size", type=int, help="default 2 for train, 1 for eval")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--amp", choices=("bfloat16", "float16"), help="autocast dtype (default fp32)")
    parser.add_argument("--json", default="benchmark.json", help="where the results go")
    parser.add_argument("--channels-last", action="store_true",
                        help="eval: time the deploy form run channels-last (model.deploy(channels_last=True), what "
                        "infer.py runs on a CPU) instead of the eval-mode model")
    parser.add_argument("--no-compile", action="store_true", help="model/all: skip the torch.compile latency")
    parser.add_argument("--no-onnx", action="store_true", help="model/all: skip the onnxruntime latency")
    parser.add_argument("--profile", action="store_true",
                        help="train/eval: after timing, profile one more step and print the top ops by self CPU time")
    parser.add_argument("--profile-rows", type=int, default=25, help="rows of each --profile table")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inputs(batch: int, size: int, device: torch.device, num_classes: int):
    """Images [B, 3, size, size] in [0, 1] and targets: the reference's 640 inputs when available, else seeded."""
    if size == 640 and REFERENCE_INPUTS.is_file():
        data = torch.load(REFERENCE_INPUTS, weights_only=True)
        images = data["images_640_u8"].float() / 255.0
        targets = list(data["targets_640"])
        reps = -(-batch // images.shape[0])
        images = images.repeat(reps, 1, 1, 1)[:batch]
        targets = (targets * reps)[:batch]
        source = "reference inputs.pt"
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.rand(batch, 3, size, size, generator=g)
        targets = []
        for _ in range(batch):
            n = 6
            centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
            sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.05
            targets.append({"boxes": torch.cat([centres, sizes], 1), "labels": torch.randint(0, num_classes, (n,), generator=g)})
        source = "seeded random"
    targets = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
    return images.to(device), targets, source


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def bench_train(cfg: dict, args, device: torch.device) -> dict:
    import dfine
    from dfine.engine.build import build_optimizer
    from dfine.engine.ema import ModelEMA

    batch = args.batch_size or 2
    model = dfine.build_model(cfg, load_pretrained=False).to(device).train()
    criterion = dfine.build_criterion(cfg).to(device).train()
    optimizer = build_optimizer(cfg, model)
    ema = ModelEMA(model)
    images, targets, source = inputs(batch, args.size, device, int(cfg.get("num_classes", 80)))
    clip = float(cfg.get("clip_max_norm") or 0.1)
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.amp)
    phases = {k: [] for k in ("forward", "criterion", "backward", "clip", "step", "train_step", "ema", "train_step_cpu")}
    for i in range(args.warmup + args.runs):
        cpu_start = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            outputs, t_fwd = timed(lambda: model(images, targets), device)
        losses, t_crit = timed(lambda: criterion(outputs, targets), device)
        _, t_bwd = timed(lambda: sum(losses.values()).backward(), device)
        _, t_clip = timed(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), clip), device)
        _, t_step = timed(optimizer.step, device)
        cpu = time.process_time() - cpu_start
        _, t_ema = timed(lambda: ema.update(model), device)
        if i >= args.warmup:
            step = t_fwd + t_crit + t_bwd + t_clip + t_step
            for name, value in zip(phases, (t_fwd, t_crit, t_bwd, t_clip, t_step, step, t_ema, cpu)):
                phases[name].append(value)
    result = {"batch": batch, "inputs": source, "median_s": {k: statistics.median(v) for k, v in phases.items()}, "runs_s": phases}
    if args.profile:
        profiles = {}
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            with profiled(profiles, "forward + criterion", device):
                losses = criterion(model(images, targets), targets)
        with profiled(profiles, "backward", device):
            sum(losses.values()).backward()
        with profiled(profiles, "clip + optimizer step", device):
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        result["profile"] = profile_tables(profiles, device, args.profile_rows)
    return result


def bench_eval(cfg: dict, args, device: torch.device, channels_last: bool | None = None) -> dict:
    """Eval forward latency of the eval-mode model, or with ``channels_last`` (default: ``--channels-last``) of
    its deploy form run channels-last."""
    import dfine

    batch = args.batch_size or 1
    model = dfine.build_model(cfg, load_pretrained=False).to(device).eval()
    channels_last = args.channels_last if channels_last is None else channels_last
    if channels_last:
        model.deploy(channels_last=True)
    images, _, source = inputs(batch, args.size, device, int(cfg.get("num_classes", 80)))
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.amp)
    times, cpu_times = [], []
    with torch.no_grad():
        for i in range(args.warmup + args.runs):
            cpu_start = time.process_time()
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                _, t = timed(lambda: model(images), device)
            if i >= args.warmup:
                times.append(t)
                cpu_times.append(time.process_time() - cpu_start)
        result = {"batch": batch, "inputs": source, "form": "deploy, channels-last" if channels_last else "eval",
                  "median_s": {"forward": statistics.median(times), "forward_cpu": statistics.median(cpu_times)},
                  "runs_s": {"forward": times, "forward_cpu": cpu_times}}
        if args.profile:
            profiles = {}
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                with profiled(profiles, "eval forward", device):
                    model(images)
            result["profile"] = profile_tables(profiles, device, args.profile_rows)
    return result


class profiled:
    """Context manager: torch.profiler over the block, its profile stored as ``profiles[name]``."""

    def __init__(self, profiles: dict, name: str, device: torch.device):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profiles, self.name, self.device = profiles, name, device
        self.profiler = profile(activities=activities)

    def __enter__(self):
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.profiler.__exit__(*exc)
        self.profiles[self.name] = self.profiler
        return False


def profile_tables(profiles: dict, device: torch.device, rows: int) -> dict:
    """``{phase: table}``: the top ``rows`` ops by self CPU time (self CUDA time as well on a GPU)."""
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {name: prof.key_averages().table(sort_by=sort_by, row_limit=rows) for name, prof in profiles.items()}


def bench_data(cfg: dict, args, device: torch.device) -> dict:
    """Images/s of decode + training transforms on the config's train dataset, ours and torchvision's."""
    import dfine
    from dfine.data.throughput import measure_pipeline

    dataset = dfine.build_dataloader(cfg, "train").dataset
    num_images = 16 * args.runs
    results = [
        measure_pipeline(str(dataset.ann_file), str(dataset.img_folder), implementation=name, image_size=args.size,
                         num_images=num_images, warmup=args.warmup)
        for name in ("dfine", "torchvision")
    ]
    return {"batch": 1, "inputs": str(dataset.ann_file), "images_per_s": {r["implementation"]: r["images_per_s"] for r in results},
            "measurements": results}


# ---- model costs and the full table (deployment helper): params, FLOPs, eager / deploy channels-last / compiled /
# onnxruntime latency


def bench_model(cfg: dict, args, device: torch.device) -> dict:
    """Params, FLOPs and eval latency (batch 1 unless --batch-size) of the eager model, its deploy form run
    channels-last, torch.compile and onnxruntime; a backend that fails is reported with its error instead of
    stopping the others."""
    import copy

    import dfine
    from dfine.deploy.profiling import compiled_latency, count_flops, count_parameters, onnx_latency

    batch = args.batch_size or 1
    model = dfine.build_model(cfg, load_pretrained=False).to(device).eval()
    images, _, source = inputs(batch, args.size, device, int(cfg.get("num_classes", 80)))
    result = {"batch": batch, "inputs": source, **count_parameters(model), **count_flops(model, images[:1])}
    latency = {"eager": bench_eval(cfg, args, device, channels_last=False)["median_s"]["forward"]}
    backends = [("deploy channels-last", lambda: bench_eval(cfg, args, device, channels_last=True)["median_s"])]
    if not args.no_compile:
        backends.append(("torch.compile", lambda: compiled_latency(copy.deepcopy(model), images, args.warmup, args.runs)))
    if not args.no_onnx:
        post = dfine.build_postprocessor(cfg)
        backends.append(("onnxruntime", lambda: onnx_latency(copy.deepcopy(model).cpu(), post, images.cpu(), args.warmup, args.runs, args.threads)))
    for name, measure in backends:
        try:
            measured = measure()
            latency[name] = measured["forward"]
            if "compile_s" in measured:
                result["compile_s"] = measured["compile_s"]
        except Exception as err:  # noqa: BLE001 - one backend missing must not hide the others
            latency[name] = None
            result.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
    result["eval_latency_s"] = latency
    result["table"] = model_table(result)
    return result


def model_table(result: dict, train: dict | None = None, data: dict | None = None) -> str:
    """The benchmark as aligned ``name  value`` rows."""
    rows = [("params (M)", f"{result['params'] / 1e6:.2f}"), ("GFLOPs (batch 1)", f"{result['gflops']:.2f}"),
            ("GMACs (batch 1)", f"{result['gmacs']:.2f}")]
    for name, value in result["eval_latency_s"].items():
        rows.append((f"eval {name} (s)", "failed" if value is None else f"{value:.4f}"))
    if "compile_s" in result:
        rows.append(("torch.compile time (s)", f"{result['compile_s']:.1f}"))
    if train:
        for name, value in train["median_s"].items():
            rows.append((f"train {name} (s)", f"{value:.4f}"))
    if data:
        for key in ("images_per_s", "batches_per_s"):
            if isinstance(data.get(key), (int, float)):
                rows.append((f"data {key.replace('_', ' ')}", f"{data[key]:.1f}"))
    for name, error in result.get("errors", {}).items():
        rows.append((f"{name} error", error[:100]))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def data_throughput(cfg: dict, size: int, num_images: int = 32) -> dict:
    """Images/s of decode + training transforms (one process) on the config's train dataset."""
    import dfine
    from dfine.data.throughput import measure_pipeline

    dataset = dfine.build_dataloader(cfg, "train").dataset
    return measure_pipeline(str(dataset.ann_file), str(dataset.img_folder), image_size=size, num_images=num_images)


def bench_all(cfg: dict, args, device: torch.device) -> dict:
    """Everything, in the protocol of ../shared/DESIGN.md: model costs and eval latency (batch 1), train step (batch 2), data."""
    batch = args.batch_size
    args.batch_size = None
    model = bench_model(cfg, args, device)
    train = bench_train(cfg, args, device)
    args.batch_size = batch
    try:
        data = data_throughput(cfg, args.size)
    except Exception as err:  # noqa: BLE001 - e.g. the dataset is not on this machine
        data = {"error": f"{type(err).__name__}: {err}"}
        model.setdefault("errors", {})["data"] = data["error"]
    data = data if isinstance(data, dict) else {"result": data}
    return {"batch": "1 eval / 2 train", "model": {k: v for k, v in model.items() if k != "table"}, "train": train,
            "data": data, "table": model_table(model, train, data)}


def check_arguments(args: argparse.Namespace) -> torch.device:
    """Every argument, before a model or the data is built; returns the device."""
    from dfine.cli import common

    common.input_file(args.config, "-c")
    common.at_least(args.threads, "--threads", 0)
    common.image_size([args.size], "--size")
    common.at_least(args.batch_size, "--batch-size", 1)
    common.at_least(args.warmup, "--warmup", 0)
    common.at_least(args.runs, "--runs", 1)
    common.at_least(args.profile_rows, "--profile-rows", 1)
    if args.profile and args.mode not in ("train", "eval"):
        raise common.usage_error(f"--profile with mode {args.mode!r}: profiling applies to the train and eval modes")
    if args.channels_last and args.mode != "eval":
        raise common.usage_error(f"--channels-last with mode {args.mode!r}: it applies to the eval mode (model and all "
                                 "time both forms; training always runs channels-last)")
    common.output_file(args.json, "--json")
    return common.device(args.device, "-d")


@run_tool
def main(argv=None) -> int:
    args = parse_args(argv)
    from dfine.config import load_config

    device = check_arguments(args)
    if args.mode in ("eval", "model"):  # as eval.py and infer.py run (train.py keeps glibc's defaults)
        retain_freed_memory()
    overrides = list(args.update)
    cfg = load_config(args.config, overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cfg.get("eval_spatial_size") not in (None, [args.size, args.size]):
        # the model caches anchors for eval_spatial_size: build it for the size it is timed at
        cfg = load_config(args.config, overrides + [f"eval_spatial_size=[{args.size}, {args.size}]"])
    run = {"train": bench_train, "eval": bench_eval, "data": bench_data, "model": bench_model, "all": bench_all}[args.mode]
    result = run(cfg, args, device)
    report = {
        "mode": args.mode, "config": args.config, "device": str(device), "threads": torch.get_num_threads(),
        "size": args.size, "amp": args.amp or "fp32", "warmup": args.warmup, "runs": args.runs,
        "torch": torch.__version__, **result,
    }
    profile = report.pop("profile", None)
    if "table" in result:
        print(f"{args.mode} benchmark: {args.config}, {report['amp']}, {args.size}px, {report['threads']} threads, "
              f"median of {args.runs} after {args.warmup} warm-ups")
        print(result["table"])
    elif "median_s" in result:
        print(f"{args.mode} benchmark: {args.config}, {report['amp']}, {args.size}px, batch {result['batch']}, "
              f"{report['threads']} threads, median of {args.runs} after {args.warmup} warm-ups ({result['inputs']})")
        for name, value in result["median_s"].items():
            print(f"  {name:<11} {value:8.4f} s")
    else:
        print(json.dumps(result, indent=1))
    for name, table in (profile or {}).items():
        print(f"\nprofile: {name} (top {args.profile_rows} ops by self time)\n{table}")
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
