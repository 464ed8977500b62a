"""The markdown of benchmarks/gpu_check.py, made only from the JSON of a run (every figure in it
comes from that file, none is typed in)."""

from __future__ import annotations

import json

SECTION = "## GPU check"


def _num(value, fmt: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{suffix}"


def _reached(flag: bool) -> str:
    return "reached" if flag else "not reached"


def _failed(part: dict) -> list[str]:
    if "skipped" in part:
        return [f"Not run: {part['skipped']}.", ""]
    return [
        f"**Failed** after {part.get('seconds', 0):.0f} s: `{part['error'].splitlines()[0][:300]}`",
        "",
        "<details><summary>traceback</summary>",
        "",
        "```",
        part.get("traceback", "").rstrip()[-4000:],
        "```",
        "",
        "</details>",
        "",
    ]


def _throughput(r: dict, env: dict) -> list[str]:
    lines = [
        f"Model `{json.dumps(r['model'])}` (MFM + PAAT + InfoNCE; bf16 autocast on CUDA), "
        f"{r['workers']} DataLoader workers (`num_workers: auto`), pretrain options "
        f"`{json.dumps({k: r['train'][k] for k in ('lr', 'warmup_steps', 'paat_warmup_steps', 'sampler')})}`.",
        "",
        "| batch | samples/s | s/step | data wait (share of step) | peak GPU memory allocated / reserved (GiB) "
        "| steps measured | run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['batch']} | {row['samples_per_s']:.0f} | {row['step_s']:.3f} | {100 * row['data_wait']:.1f}% "
            f"| {_num(row['peak_memory_gib'])} / {_num(row['peak_reserved_gib'])} | {row['measured_steps']} "
            f"| {row['run_s']:.0f} |"
        )
    target, reached = r["targets"], r["reached"]
    lines += [
        "",
        f"Targets: ≥ {target['samples_per_s']} samples/s: **{_reached(reached['samples_per_s'])}**; "
        f"data wait < {100 * target['data_wait']:.0f} % of the step: **{_reached(reached['data_wait'])}**.",
        "",
        "Loss (whole run, first and last logged step, warm-up included):",
        "",
        "| batch | step | loss | InfoNCE | MFM | PAAT |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        for point in (row["loss_curve"][0], row["loss_curve"][-1]):
            lines.append(
                f"| {row['batch']} | {point['step']} | {_num(point['loss'], '.4f')} | "
                f"{_num(point['loss_infonce'], '.4f')} | {_num(point['loss_mfm'], '.4f')} | "
                f"{_num(point['loss_paat'], '.4f')} |"
            )
    return lines + [""]


def _profile(p: dict) -> list[str]:
    lines = [
        f"Batch {p['batch']}: steps {p['profiled_steps'][0]}–{p['profiled_steps'][1]} under `torch.profiler`, "
        f"{p['wall_s_per_step'] * 1000:.1f} ms per step; GPU busy {_num(p['gpu_busy_fraction'], '.0%')} of it "
        "(kernel time / wall time)." + (f" Trace: `{p['trace']}`." if p.get("trace") else ""),
        "",
    ]
    syncs = p.get("syncs_per_step")
    if syncs is None:
        lines.append(f"Host-device syncs in the step: {p['sync_audit']}.")
    elif not syncs:
        lines.append(
            f"Host-device syncs in the step (steps {p['audited_steps'][0]}–{p['audited_steps'][1]}, "
            "CUDA sync debug mode): **none**."
        )
    else:
        lines += [
            f"Host-device syncs in the step (steps {p['audited_steps'][0]}–{p['audited_steps'][1]}, "
            "CUDA sync debug mode), per step:",
            "",
            "| syncs per step | where |",
            "|---|---|",
        ]
        lines += [f"| {n:g} | `{site.replace('|', '¦')}` |" for site, n in syncs.items()]  # no | in a cell
    ops = ", ".join(f"`{k}` {v:g}" for k, v in p.get("sync_ops_per_step", {}).items()) or "none"
    lines += ["", f"Synchronising operators per profiled step: {ops}.", ""]
    top = p.get("top_gpu") or p.get("top_cpu") or []
    kind = "GPU kernels" if p.get("top_gpu") else "operators (self CPU time)"
    if top:
        lines += [f"Top {kind}, ms per step: " + "; ".join(f"`{t['op'][:60]}` {t['ms_per_step']:.2f}" for t in top[:8])]
    return lines + [""]


def _resume(r: dict) -> list[str]:
    a, b = r["resumed_vs_uninterrupted"], r.get("uninterrupted_vs_repeat")
    lines = [
        f"`{json.dumps(r['model'])}`, batch {r['batch_size']}, {r['steps']} steps, a resume checkpoint every "
        f"{r['checkpoint_every']}: the run was SIGKILLed after writing the checkpoint of step "
        f"{r['killed_after_checkpoint_of_step']}, rerun with the same command to the end, and compared with an "
        "uninterrupted run of the same seed.",
        "",
        "| comparison | tensors bit-exact | max abs weight diff | relative to the largest weight | max loss diff "
        "(metrics.tsv) |",
        "|---|---|---|---|---|",
    ]
    for name, c in (("resumed vs uninterrupted", a), ("uninterrupted vs its repeat", b)):
        if c is not None:
            lines.append(
                f"| {name} | {c['bit_exact_tensors']} / {c['tensors']} | {c['max_abs_diff']:.3g} | "
                f"{_num(c['max_abs_diff_relative_to_max_weight'], '.3g')} | {c['metrics_max_abs_diff']:.3g} |"
            )
    return lines + ["", f"Verdict: {r['explanation']}.", ""]


def _workflow(w: dict) -> list[str]:
    slowest = sorted(w["rule_seconds"].items(), key=lambda kv: kv[1], reverse=True)[:6]
    return [
        f"`{w['command']}` with `pretrain.device` and `finetune.device` set to the device: "
        f"{w['wall_s']:.0f} s on {w['cores']} cores; {w['pretrain_steps']} pretraining steps (final loss "
        f"{w['final_loss']:.3f}), every method of `evaluate.methods` in `summary.tsv` "
        f"(Pearson, all genes: {', '.join(f'{m} {v:.3f}' for m, v in w['pearson_all_genes'].items())}), "
        f"virtual Visium of `tiny_p` on {w['virtual_visium_tiles']} tiles. Jobs whose log says they ran on the "
        "device: " + ", ".join(f"{r} {n['on_device']}/{n['jobs']}" for r, n in w["gpu_rules"].items()) + ".",
        "",
        "Slowest rules (s, summed over jobs): " + ", ".join(f"{r} {s:.0f}" for r, s in slowest) + ".",
        "",
    ]


def _limits(results: dict) -> list[str]:
    """What bounds the throughput, read off the figures: data wait, then the GPU's busy share."""
    parts = results.get("parts", {})
    if results.get("environment", {}).get("device") != "cuda" or not all(
        parts.get(n, {}).get("ok") for n in ("throughput", "profile")
    ):
        return []
    rows, busy = parts["throughput"]["result"]["rows"], parts["profile"]["result"]["gpu_busy_fraction"]
    wait = max(r["data_wait"] for r in rows)
    if wait >= 0.10:
        limit = f"the input pipeline: the step waits for data {100 * wait:.0f} % of the time"
    elif busy is not None and busy < 0.8:
        limit = (
            f"the host: the GPU is busy {100 * busy:.0f} % of the profiled step, so it waits for the CPU "
            "(kernel launches, the syncs listed above)"
        )
    else:
        limit = f"the GPU's own work (busy {_num(busy and 100 * busy, '.0f')} % of the step): the top kernels above"
    return ["### What limits it", "", f"Read off the figures above: {limit}.", ""]


TITLES = {
    "throughput": ("### Pretraining throughput", _throughput),
    "profile": ("### Profile of the training step", _profile),
    "resume": ("### Kill and resume", _resume),
    "workflow": ("### The tiny workflow on the device", _workflow),
}


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    device = env.get("device", "?")
    where = (
        f"{env.get('gpu')} ({_num(env.get('gpu_memory_gib'), '.0f')} GiB, compute capability "
        f"{env.get('gpu_capability')}, driver {env.get('driver')})"
        if device == "cuda"
        else "CPU only: a check that the script works, not a GPU result"
    )
    packages = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v)
    lines = [
        SECTION,
        "",
        f"Device: {where}; {env.get('cores_available')} cores, Python {env.get('python')}, torch CUDA "
        f"{env.get('torch_cuda')}; {packages}. Commit {env.get('commit')}, mode `{results.get('mode')}`, "
        f"{results.get('total_s', 0):.0f} s in all. Data: {results.get('data', {}).get('spots_per_sample')} "
        "simulated spots x 2 samples (224 px uint8 patches, 128-token sentences).",
        "",
        "Command:",
        "",
        "```bash",
        results.get("command", "?"),
        "```",
        "",
    ]
    for name, (title, render) in TITLES.items():
        part = results.get("parts", {}).get(name)
        if part is None:
            continue
        lines += [title, ""]
        if not part["ok"]:
            lines += _failed(part)
            continue
        try:
            lines += render(*((part["result"], env) if name == "throughput" else (part["result"],)))
        except Exception as err:  # the JSON holds the figures; the text must still be written
            lines += [f"(this part ran, but its table could not be written: {type(err).__name__}: {err})", ""]
    lines += _limits(results)
    return "\n".join(lines).rstrip("\n") + "\n"
